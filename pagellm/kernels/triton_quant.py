"""Fused quantized matmuls in Triton: each weight byte is read once and
dequantized in registers, never written back (W8A8: multiplied as int8). The int8 kernel without its
scales is also the batch-1 GEMV of dense bf16/fp16 weights (``dense_matmul``),
used for the shapes where it beats cuBLAS (``DENSE_GEMV``).

Layouts are those of :mod:`pagellm.kernels.torch_quant` (the reference twins):
int8 ``q [N, K]`` with a scale per row; int4 eight codes per 32-bit word,
interleaved in runs of 128 (nibbles i and i + 4 of word w are weights
32 i + 2 w and 32 i + 2 w + 1), with an fp16 scale and a uint8 zero point per
group of ``GROUP`` (= the run) along K.

Grid ``(cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M))``: a program owns
``BLOCK_M`` rows, ``BLOCK_N`` output channels and a run of K tiles. More than
one row goes through ``tl.dot`` (bf16/fp16 in, fp32 accumulate). A single row
(batch-1 decode) is a GEMV, which at these sizes is bound by instruction issue
as much as by memory: the H200 streams ~4e12 int8 or ~8e12 int4 codes a
second, and I2F converts only 16 values per SM per clock. So the GEMVs never
convert a code; each is placed on the mantissa of a float whose exponent
makes it an integer. int8: one shift per word and one LOP3 per code make the
fp32 ``2**15 + byte``, one FFMA multiplies it into a per-thread accumulator,
and the constant's share is subtracted once per output (``BYTE_EXPONENT``
comes in as a runtime argument so it stays in a register): ~3.9 SASS
instructions a code. int4 works on two codes at once in the activations'
own 16-bit format (bf16x2 or fp16x2, ``HALF2_PAIR_ASM``): one LOP3 puts two
nibbles of adjacent weights under ``base``'s exponent in the two halves of a
register, one HADD2 takes ``base + zero`` off (exact), one HFMA2 multiplies
the pair with the matching pair of activations, read as one 32-bit word;
eight products a half are summed in 16 bits, then folded into fp32 with the
group's scale. That is 2.4-2.8 SASS instructions a code in the compiled loop
(3.9-4.8 with one fp32 FFMA a code). Products are summed elementwise over the
K loop and reduced once at the end.

With ``split_k == 1`` each program writes its outputs (bias added) in the
activation dtype; a split writes fp32 partial sums to ``[split_k, M, N]``
that one ``sum`` reduces, so results never depend on the order programs
finish in. Launch shapes depend only on (M, N, K), so the kernels are safe
inside CUDA graphs.

W8A8 (``w8a8_matmul``) multiplies int8 activations by the int8 codes on int8
tensor cores into int32, exactly, for any number of rows (no GEMV: one row
takes a masked 16-row tile), and applies ``xscale[m] * scale[n]`` (+ bias) in
fp32 once. Its activations come from ``quantize_per_token``: one program a
row, SmoothQuant's input scale folded in, codes and scales bit for bit
``torch_quant.quantize_per_token``'s (correctly rounded divisions, rounding
half to even). Its programs take their tiles in bands of ``GROUP_M`` m tiles
per n tile, so a decode batch's rows share each weight tile's DRAM read.

The dense GEMV launches with programmatic dependent launch (``triton_ops``'
``PDL``): each program loads its first weight tile, a constant, before it waits
for the kernel that wrote x, so a projection's first wave of weight reads may
overlap the norm or attention before it (together with PDL on the other
kernels: 15-20 us of a 4.5 ms bs1 step on an H200).

A merged gate|up matrix at one row can end in ``silu(gate) * up``
(``dense_silu_and_mul``, ``GATED``; off: ``FUSED_SILU``): a program takes
``BLOCK_N / 2`` gate rows and the up rows ``I`` further, rounds both sums to
the output dtype as the plain GEMV stores them and computes
``triton_ops.silu_and_mul``'s fp32 math on them, so the output is bit for bit
the two launches' and one launch (and its dependency) per layer goes: 85 us of
a Llama-3-8B bs1 step (4.49 -> 4.40 ms) on an H200.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagellm.kernels.quant_ops import FUSED_MAX_ROWS
from pagellm.kernels.triton_ops import pdl_args, wait_for_producer

GROUP = 128     # int4 group size the kernel takes
FUSED_SILU = True   # off: the benchmarks' "before" (the GEMV, then triton_ops.silu_and_mul)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int    # split K until the grid has about this many programs per SM (1: no split)


# Chosen on an H200 by `benchmarks/quant_gpu.py --sections sweep` (the fastest sum over the four Llama-3-8B
# projections, replayed as CUDA graphs; GEMV and LARGE int8 from h200-2026-12-02-quant-gemv.json; the int4
# one-row tiles re-swept for the bf16x2 GEMV in h200-2026-12-02-quant-int4-tuned.json: the same GEMV tile). LARGE
# serves decode batches of 17..FUSED_MAX_ROWS rows (`quant_ops`); longer prefill chunks go to dequantize +
# cuBLAS.
GEMV = {"int8": MatmulConfig(1, 8, 1024, 4, 3, 1), "int4": MatmulConfig(1, 16, 1024, 8, 3, 1)}
SMALL = {"int8": MatmulConfig(16, 128, 256, 4, 3, 2), "int4": MatmulConfig(16, 32, 256, 4, 3, 8),
         "w8a8": MatmulConfig(16, 64, 256, 4, 4, 2)}
LARGE = {"int8": MatmulConfig(128, 256, 64, 8, 3, 1), "int4": MatmulConfig(128, 64, 128, 8, 4, 1),
         "w8a8": MatmulConfig(128, 128, 128, 8, 3, 1)}
# More than FUSED_MAX_ROWS rows (prefill chunks), for the formats that multiply them fused (W8A8 only: the
# weight-only ones dequantize for cuBLAS there). W8A8's LARGE tile is the 256-row sweep's best
# (h200-2026-12-02-quant-w8a8-sweep.json: 0.171 ms for the four projections, bf16 cuBLAS 0.190); PREFILL is
# not swept: 128 x 256, int8 K tiles of 128; SMALL's 16 rows go through mma.sync with split K, as the
# weight-only ones.
PREFILL = {"w8a8": MatmulConfig(128, 256, 128, 8, 3, 1)}
TABLES = {"GEMV": GEMV, "SMALL": SMALL, "LARGE": LARGE, "PREFILL": PREFILL}


# Dense bf16 weights at one row, by (N, K): the tiles that beat cuBLAS by 3% or more on an H200 for that
# shape (`benchmarks/graphs_gpu.py`, weights cold in L2 as in a decode step; h200-2026-12-02-graphs.json):
# Llama-3-8B's qkv 14.6 vs 16.5 us, o 11.1 vs 12.6, gate_up 56.3 vs 58.9, down 29.8 vs 31.2 (the LM head,
# 233.7 vs 238.8, stays with cuBLAS). Other shapes stay with cuBLAS until measured.
DENSE_GEMV: dict[tuple[int, int], MatmulConfig] = {
    (6144, 4096): MatmulConfig(1, 2, 2048, 4, 3, 1), (4096, 4096): MatmulConfig(1, 4, 2048, 8, 3, 1),
    (28672, 4096): MatmulConfig(1, 16, 512, 4, 3, 4), (4096, 14336): MatmulConfig(1, 4, 2048, 8, 3, 1)}


# One row, by (format, N, K): the shapes whose own best tiles in that sweep differ from GEMV's (Llama-3-8B's
# qkv, gate_up and LM head; the others take GEMV's).
GEMV_SHAPES: dict[tuple[str, int, int], MatmulConfig] = {
    ("int8", 6144, 4096): MatmulConfig(1, 16, 512, 4, 3, 1), ("int8", 28672, 4096): MatmulConfig(1, 16, 256, 2, 3, 1),
    ("int8", 128256, 4096): MatmulConfig(1, 16, 256, 2, 3, 1), ("int4", 28672, 4096): MatmulConfig(1, 64, 256, 4, 3, 4),
    # the bf16x2 int4 GEMV's own sweep (h200-2026-12-02-quant-int4-tuned.json): qkv and down split K
    ("int4", 6144, 4096): MatmulConfig(1, 16, 1024, 8, 3, 4), ("int4", 4096, 14336): MatmulConfig(1, 16, 1024, 8, 3, 4)}


def table_for(fmt: str, m: int) -> str:
    """The name of the tile table (``TABLES``) serving ``m`` rows of ``fmt``."""
    if m == 1 and fmt in GEMV:
        return "GEMV"
    if m <= 16:
        return "SMALL"
    return "PREFILL" if m > FUSED_MAX_ROWS and fmt in PREFILL else "LARGE"


def config_for(fmt: str, m: int, n: int, k: int) -> MatmulConfig:
    table = table_for(fmt, m)
    if table == "GEMV":
        return GEMV_SHAPES.get((fmt, n, k), GEMV[fmt])
    return TABLES[table][fmt]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_for(config: MatmulConfig, m: int, n: int, k_tiles: int, device_index: int) -> int:
    """Largest power of two <= the K tiles that brings the grid to ~programs_per_sm programs per SM."""
    programs = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
    limit = min(max(1, config.programs_per_sm * _num_sms(device_index) // programs), k_tiles)
    return 1 << (limit.bit_length() - 1)


@triton.jit
def _int8_as_f32(q):
    """int8 codes -> exact fp32 without a conversion instruction: ``q + 0x4B000080`` is the bit pattern of
    the float ``2**23 + 128 + q`` (q in -128..127 stays inside the mantissa), so one integer add and one
    float subtract replace I2F, which issues at a quarter of the FMA rate and bounded the GEMV."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dot_tile(acc, x_ptr, rows, ks, M, K, stride_xm, w):
    """acc [BLOCK_M, BLOCK_N] += x[rows, ks] @ w^T on tensor cores (``w [BLOCK_N, BLOCK_K]``, cast to x's dtype)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks < K)[None, :],
                other=0.0)
    return acc + tl.dot(x, tl.trans(w.to(x.dtype)))


@triton.jit
def _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om,
           HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT:
        tl.store(out_ptr + split * stride_ok + rows[:, None] * stride_om + cols[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# Float bit patterns the GEMVs OR codes into, passed as runtime arguments: as immediates the compiler
# rematerializes them before every use (a MOV per code), as arguments they stay in a register.
BYTE_EXPONENT = 0x47000000              # the float 2**15: a byte on bits 8..15 reads as 2**15 + byte
SIGN_FLIP = tl.constexpr(-0x7F7F7F80)     # 0x80808080 as an int32: XOR makes four int8 codes q bytes q + 128


@triton.jit
def _byte_plane(moved, exponent):
    """Bits 8..15 of each word under ``exponent`` (0x47000000): the float ``32768 + byte`` (no I2F)."""
    return ((moved & 0xFF00) | exponent).to(tl.float32, bitcast=True)


@triton.jit
def _int8_gemv_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                      stride_xm, stride_qn, stride_ok, stride_om, exponent,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """One row times int8 codes read as int32 words (``q_ptr``: ``[N, K/4]``, ``stride_qn`` in words; code
    ``4w + b`` in byte b of word w), times per-row scales; ``exponent``: ``BYTE_EXPONENT``.

    Each word is flipped to biased bytes ``q + 128`` once; byte b is moved to bits 8..15 (one shift, none
    for b = 1) and made the float ``32768 + 128 + q`` by one LOP3, then multiplied into a
    ``[BLOCK_N, BLOCK_K / 4]`` accumulator by one FMA. x is loaded contiguously and split into its four
    byte planes in registers. The constant's share, ``32896 * sum x``, is the same for every output and
    is subtracted once after the K loop (it costs ~2**15 / |q| ulps of fp32, far below bf16's rounding)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) + tl.arange(0, 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    partial = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_K // 4,), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        ws = tile * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
        words = tl.load(q_ptr + cols[:, None] * stride_qn + ws[None, :],
                        mask=col_ok[:, None] & (ws < K // 4)[None, :], other=0) ^ SIGN_FLIP
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tl.program_id(2) * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (BLOCK_K // 4, 2, 2)))     # x[4w + 2i], x[4w + 2i + 1]
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        partial += _byte_plane(words << 8, exponent) * x0[None, :]
        partial += _byte_plane(words, exponent) * x1[None, :]
        partial += _byte_plane(words >> 8, exponent) * x2[None, :]
        partial += _byte_plane(words >> 16, exponent) * x3[None, :]
        x_sum += (x0 + x1) + (x2 + x3)
    acc = (tl.sum(partial, axis=1) - 32896.0 * tl.sum(x_sum, axis=0))[None, :]
    acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


@triton.jit
def _weight_tile(q_ptr, cols, col_ok, ks, K, stride_qn):
    return tl.load(q_ptr + cols[:, None] * stride_qn + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0)


@triton.jit
def _row_products(w, x_ptr, ks, K):
    """``w [BLOCK_N, BLOCK_K] * x[ks]`` elementwise in fp32 (one row's share of a GEMV tile)."""
    x = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    return w.to(tl.float32) * x[None, :]


@triton.jit
def _int8_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                 stride_xm, stride_qn, stride_ok, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr = True,
                 PDL: tl.constexpr = False, GATED: tl.constexpr = False):
    """int8 codes times per-row scales (rows through ``tl.dot``; one row goes to ``_int8_gemv_kernel``), or
    (``HAS_SCALE`` False) a dense float matrix, whose one row is summed elementwise into a
    ``[BLOCK_N, BLOCK_K]`` accumulator, reduced once after the K loop. With ``PDL`` the one-row path
    loads its first tile before ``wait_for_producer`` (the same sums: 0 + w x is w x). ``GATED`` (one row,
    no split, no bias): ``N`` rows of gate|up in, ``silu(gate) * up`` out (``N / 2`` columns)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATED:   # BLOCK_N / 2 gate rows, then the up rows of the same outputs
        lanes = tl.arange(0, BLOCK_N)
        outputs = pid_n * (BLOCK_N // 2) + lanes % (BLOCK_N // 2)
        cols = outputs + lanes // (BLOCK_N // 2) * (N // 2)
        col_ok = outputs < N // 2
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
    first = split * tiles_per_split
    if BLOCK_M == 1:
        if PDL:
            ks = first * BLOCK_K + tl.arange(0, BLOCK_K)
            w = _weight_tile(q_ptr, cols, col_ok, ks, K, stride_qn)
            wait_for_producer(PDL)
            partial = _row_products(w, x_ptr + tl.program_id(2) * stride_xm, ks, K)
            first += 1
        else:
            partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        wait_for_producer(PDL)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        q = _weight_tile(q_ptr, cols, col_ok, ks, K, stride_qn)
        if BLOCK_M == 1:
            partial += _row_products(q, x_ptr + tl.program_id(2) * stride_xm, ks, K)
        else:
            acc = _dot_tile(acc, x_ptr, rows, ks, M, K, stride_xm, _int8_as_f32(q) if HAS_SCALE else q)
    if BLOCK_M == 1:
        acc = tl.sum(partial, axis=1)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if GATED:
        _store_silu_and_mul(acc, out_ptr + tl.program_id(2) * stride_om, pid_n, N // 2, BLOCK_N // 2)
    else:
        _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


@triton.jit
def _store_silu_and_mul(acc, out_ptr, pid_n, inter, HALF: tl.constexpr):
    """``acc [1, 2 HALF]``: the sums of HALF gate rows, then of their up rows. Rounded to the output dtype
    (as the GEMV stores them), then ``triton_ops.silu_and_mul``'s math: fp32, rounded once."""
    gate_up = tl.reshape(acc.to(out_ptr.dtype.element_ty).to(tl.float32), (2, HALF))
    gate, up = tl.split(tl.permute(gate_up, (1, 0)))
    outputs = pid_n * HALF + tl.arange(0, HALF)
    tl.store(out_ptr + outputs, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=outputs < inter)


# One pair of packed words times its activations, two codes an instruction (bf16x2/fp16x2 arithmetic):
# $1, $2: the words (eight codes each, ``torch_quant``'s layout); $3..$10: the activation pairs of their
# nibble pairs i = 0..3 (word 1's, then word 2's); $11: ``-(base + zero)`` in both halves; $12: the float
# ``base`` in both halves (``HALF2_MAGICS``). Per nibble pair: a shift (none for i = 0), one LOP3 putting the
# two nibbles under ``base``'s exponent (``base + q`` in each half, exact), one FMA taking ``base + zero``
# off (``q - zero``, exact), one FMA multiplying it into the sum. $0: the sixteen products summed in two
# halves of eight (rounded as bf16/fp16), as fp32.
_HALF2_PAIR_ASM = """{
.reg .b32 w, h, d, one, acc;
.reg .b16 lo, hi;
.reg .b32 f_lo, f_hi;
mov.b32 one, ONE;
mov.b32 acc, 0;
""" + "".join(
    ("mov.b32 w, $%d;\n" % (1 + word)) + "".join(
        ("" if i == 0 else "shr.u32 w, w, 4;\n")
        + "lop3.b32 h, w, 0x000F000F, $12, 0xEA;\n"
        + "fma.rn.DTYPEx2 d, h, one, $11;\n"
        + "fma.rn.DTYPEx2 acc, d, $%d, acc;\n" % (3 + 4 * word + i)
        for i in range(4))
    for word in range(2)) + "TO_F32\nadd.f32 $0, f_lo, f_hi;\n}"
# the two halves as fp32: a bf16 is the top half of its fp32, an fp16 needs a conversion
HALF2_PAIR_ASM_BF16 = tl.constexpr(_HALF2_PAIR_ASM.replace("DTYPE", "bf16").replace("ONE", "0x3F803F80").replace(
    "TO_F32", "shl.b32 f_lo, acc, 16;\nand.b32 f_hi, acc, 0xFFFF0000;"))
HALF2_PAIR_ASM_F16 = tl.constexpr(_HALF2_PAIR_ASM.replace("DTYPE", "f16").replace("ONE", "0x3C003C00").replace(
    "TO_F32", "mov.b32 {lo, hi}, acc;\ncvt.f32.f16 f_lo, lo;\ncvt.f32.f16 f_hi, hi;"))
HALF2_PAIR_OPERANDS = tl.constexpr("=r" + ",r" * 12)   # all 32-bit registers
HALF2_MAGICS = {torch.bfloat16: 0x43004300, torch.float16: 0x64006400}   # 128 / 1024: a nibble on bits 0..3 is base + q


@triton.jit
def _int4_codes(words):
    """Packed words ``[BLOCK_N, RUNS, 16]`` -> codes ``[BLOCK_N, RUNS, 4, 16, 2]`` (K order: weight
    ``32 i + 2 w + b`` is nibble ``i + 4 b`` of word ``w``) as exact fp32."""
    shifts = 4 * tl.arange(0, 4)[:, None, None] + 16 * tl.arange(0, 2)[None, None, :]
    planes = (words[:, :, None, :, None] >> shifts[None, None, :, :, :]) & 0xF
    return (planes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _int4_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                 stride_xm, stride_qn, stride_sn, stride_ok, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Rows through ``tl.dot`` (one bf16/fp16 row goes to ``_int4_gemv_kernel``). ``q_ptr``: the packed
    codes as int32 words ``[N, K/8]`` (``stride_qn`` in words); ``GROUP`` is the packing run (128), so a
    run's 16 words are one group with one scale and zero point."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    runs = tl.arange(0, BLOCK_K // GROUP)
    word_offsets = runs[:, None] * 16 + tl.arange(0, 16)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        words = tl.load(q_ptr + cols[:, None, None] * stride_qn + tile * (BLOCK_K // 8) + word_offsets[None, :, :],
                        mask=col_ok[:, None, None], other=0)
        meta = cols[:, None] * stride_sn + tile * (BLOCK_K // GROUP) + runs[None, :]
        zero = tl.load(zero_ptr + meta, mask=col_ok[:, None], other=0).to(tl.float32)
        scale = tl.load(scale_ptr + meta, mask=col_ok[:, None], other=0.0).to(tl.float32)
        w = (_int4_codes(words) - zero[:, :, None, None, None]) * scale[:, :, None, None, None]
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = _dot_tile(acc, x_ptr, rows, ks, M, K, stride_xm, tl.reshape(w, (BLOCK_N, BLOCK_K)))
    _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


@triton.jit
def _word_pairs(words):
    """``[A, B, 16]`` -> words ``2 p`` and ``2 p + 1``, each ``[A, B, 8]``."""
    return tl.split(tl.reshape(words, (words.shape[0], words.shape[1], 8, 2)))


@triton.jit
def _half2_pair_products(first, second, x0, x1, x2, x3, x4, x5, x6, x7, neg_base, magic, BF16: tl.constexpr):
    """``HALF2_PAIR_ASM`` (bf16 or fp16 arithmetic) over a pair of word tensors; ``x0..x3``: the activation
    pairs of the first words' nibble pairs 0..3, ``x4..x7`` the second's (int32 words holding two)."""
    if BF16:
        return tl.inline_asm_elementwise(HALF2_PAIR_ASM_BF16, HALF2_PAIR_OPERANDS,
                                         [first, second, x0, x1, x2, x3, x4, x5, x6, x7, neg_base, magic],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(HALF2_PAIR_ASM_F16, HALF2_PAIR_OPERANDS,
                                     [first, second, x0, x1, x2, x3, x4, x5, x6, x7, neg_base, magic],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                      stride_xm, stride_qn, stride_sn, stride_ok, stride_om, magic,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """One row (bf16 or fp16, read as 32-bit pairs) times packed int4 words ``[N, K/8]``; ``magic``: the
    activation dtype's ``HALF2_MAGICS``. A program's tile is ``[BLOCK_N, RUNS, 8, 2]`` words (a run of 16
    is one group); the two words of a pair go through ``HALF2_PAIR_ASM`` together and their fp32 sum is
    scaled by the group's scale into a ``[BLOCK_N, RUNS, 8]`` accumulator, reduced after the K loop."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) + tl.arange(0, 1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_cols = tl.minimum(cols, N - 1)     # rows past N read row N - 1 (unmasked loads), never stored
    runs = tl.arange(0, BLOCK_K // GROUP)
    words_at = safe_cols[:, None, None] * stride_qn + runs[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    x_at = runs[None, :, None] * 64 + tl.arange(0, 16)[None, None, :]    # activation pairs of nibble pair 0 (+16 i: i)
    meta_at = safe_cols[:, None] * stride_sn + runs[None, :]
    x_words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.program_id(2) * (stride_xm // 2)
    partial = tl.zeros((BLOCK_N, BLOCK_K // GROUP, 8), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        first, second = _word_pairs(tl.load(q_ptr + tile * (BLOCK_K // 8) + words_at))
        zero = tl.load(zero_ptr + tile * (BLOCK_K // GROUP) + meta_at).to(tl.int32)
        scale = tl.load(scale_ptr + tile * (BLOCK_K // GROUP) + meta_at).to(tl.float32)
        neg_base = (magic | -0x7FFF8000) | (zero * 0x10001)     # -(base + zero) in both halves
        x_tile = x_words + tile * (BLOCK_K // 2) + x_at
        x0a, x0b = _word_pairs(tl.load(x_tile))
        x1a, x1b = _word_pairs(tl.load(x_tile + 16))
        x2a, x2b = _word_pairs(tl.load(x_tile + 32))
        x3a, x3b = _word_pairs(tl.load(x_tile + 48))
        sums = _half2_pair_products(first, second, x0a, x1a, x2a, x3a, x0b, x1b, x2b, x3b, neg_base[:, :, None],
                                    magic, x_ptr.dtype.element_ty == tl.bfloat16)
        partial += sums * scale[:, :, None]
    acc = tl.sum(tl.reshape(partial, (BLOCK_N, BLOCK_K // 16)), axis=1)[None, :]
    _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


# fp32 1.5 * 2**23: adding it rounds a float of magnitude < 2**22 to an integer (half to even, as
# torch.round), which then sits in the low mantissa bits: its bit pattern minus ROUNDING_BITS is that integer.
ROUNDING_MAGIC = tl.constexpr(12582912.0)
ROUNDING_BITS = tl.constexpr(0x4B400000)


@triton.jit
def _quantize_rows_kernel(x_ptr, input_scale_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr, HAS_INPUT_SCALE: tl.constexpr):
    """One row of ``x`` (times ``input_scale``, rounded to x's dtype as torch's ``x * input_scale.to(x.dtype)``
    is: the fp32 product of two 16-bit floats is exact, so one rounding) -> int8 codes and one fp32 scale,
    bit for bit ``torch_quant.quantize_per_token``: ``scale = max(absmax, 1e-12) / 127`` and
    ``round(x / scale)`` clamped to [-127, 127], both divisions correctly rounded (``div_rn``; Triton's ``/``
    is approximate on fp32). The row is held whole (``BLOCK_K`` >= K), so x is read once."""
    row = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * stride_xm + ks, mask=ks < K, other=0.0)
    if HAS_INPUT_SCALE:
        smoothing = tl.load(input_scale_ptr + ks, mask=ks < K, other=0.0).to(x.dtype).to(tl.float32)
        x = (x.to(tl.float32) * smoothing).to(x.dtype)
    x = x.to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 127.0)
    rounded = (tl.math.div_rn(x, scale) + ROUNDING_MAGIC).to(tl.int32, bitcast=True) - ROUNDING_BITS
    q = tl.minimum(tl.maximum(rounded, -127), 127).to(tl.int8)
    tl.store(q_ptr + row * stride_qm + ks, q, mask=ks < K)
    tl.store(scale_ptr + row, scale)


GROUP_M = tl.constexpr(8)     # W8A8 m tiles that run side by side over each weight tile (``_w8a8_kernel``)


@triton.jit
def _grouped_tiles(GROUP: tl.constexpr):
    """(m tile, n tile) of this program over a ``(n tiles, split, m tiles)`` grid, renumbered so that
    consecutive programs take the m tiles of a band of ``GROUP`` against one n tile, then the next n tile:
    a weight tile is read from DRAM once per band (all of a decode batch's rows), not once per m tile."""
    n_tiles, m_tiles = tl.num_programs(0), tl.num_programs(2)
    pid = tl.program_id(2) * n_tiles + tl.program_id(0)
    band_programs = GROUP * n_tiles
    first = pid // band_programs * GROUP
    band_rows = tl.minimum(m_tiles - first, GROUP)
    return first + pid % band_programs % band_rows, pid % band_programs // band_rows


@triton.jit
def _w8a8_kernel(x_ptr, q_ptr, scale_ptr, xscale_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                 stride_xm, stride_qn, stride_ok, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """int8 rows ``x [M, K]`` times int8 codes ``q [N, K]`` on int8 tensor cores, exactly, into an int32
    accumulator (|sum| <= K * 127**2: K up to 133,000), then ``acc * xscale[m] * scale[n]`` in fp32 (+ bias)
    to the output dtype. Rows, columns and K past the matrix are masked (loaded as 0, never stored)."""
    pid_m, pid_n = _grouped_tiles(GROUP_M)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = _dot_tile(acc, x_ptr, rows, ks, M, K, stride_xm, _weight_tile(q_ptr, cols, col_ok, ks, K, stride_qn))
    xscale = tl.load(xscale_ptr + rows, mask=rows < M, other=0.0)
    out = acc.to(tl.float32) * xscale[:, None] * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    _store(out, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


def _launch(kernel, fmt: str, x: torch.Tensor, n: int, weight_args: tuple, weight_strides: tuple,
            bias: torch.Tensor | None, config: MatmulConfig | None, magics: tuple = (),
            out_dtype: torch.dtype | None = None, **constants) -> torch.Tensor:
    """``kernel`` over ``x [..., K]`` and ``n`` output columns; the output in ``out_dtype`` (x's dtype if None)."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    config = config or config_for(fmt, m, n, k)
    block_k = config.block_k
    if fmt == "int4":   # whole groups per tile, and whole tiles per row
        block_k = max(GROUP, block_k)
        while k % block_k:    # tile sizes are powers of two (tl.arange); GROUP always divides K
            block_k //= 2
    k_tiles = triton.cdiv(k, block_k)
    split_k = split_k_for(config, m, n, k_tiles, x.device.index or 0)
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    out_cols = n // 2 if constants.get("GATED") else n
    if split_k > 1:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)   # every element is written
        strides = (out.stride(0), out.stride(1))
    else:
        out = torch.empty(m, out_cols, dtype=out_dtype, device=x.device)
        strides = (0, out.stride(0))
    grid = (triton.cdiv(n, config.block_n), split_k, triton.cdiv(m, config.block_m))
    kernel[grid](x2, *weight_args, bias if bias is not None else x2, out, m, n, k, k_tiles, tiles_per_split,
                 x2.stride(0), *weight_strides, *strides, *magics, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                 BLOCK_K=block_k, HAS_BIAS=bias is not None, SPLIT=split_k > 1, num_warps=config.num_warps,
                 num_stages=config.num_stages, **constants)
    if split_k > 1:
        out = out.sum(0)
        out = (out if bias is None else out + bias).to(out_dtype)
    return out.reshape(*lead, out_cols)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` @ dequant(q)^T + bias."""
    if x.numel() == x.shape[-1] and q.shape[1] % 4 == 0:    # one row: the codes as int32 words
        words = q.view(torch.int32)
        return _launch(_int8_gemv_kernel, "int8", x, q.shape[0], (words, scale), (words.stride(0),), bias, config,
                       (BYTE_EXPONENT,))
    return _launch(_int8_kernel, "int8", x, q.shape[0], (q, scale), (q.stride(0),), bias, config)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 config: MatmulConfig) -> torch.Tensor:
    """``x [..., K] @ weight^T + bias`` for a float ``weight [N, K]`` (the int8 kernel without scales)."""
    return _launch(_int8_kernel, "int8", x, weight.shape[0], (weight, weight), (weight.stride(0),), bias, config,
                   HAS_SCALE=False, **pdl_args(x))


def dense_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, config: MatmulConfig) -> torch.Tensor:
    """``silu(x @ gate^T) * (x @ up^T)`` of one row for ``weight = cat(gate, up) [2I, K]``, in one launch
    (never split along K: the epilogue needs whole sums; ``programs_per_sm`` 0 keeps one split)."""
    assert x.numel() == x.shape[-1] and weight.shape[0] % 2 == 0
    return _launch(_int8_kernel, "int8", x, weight.shape[0], (weight, weight), (weight.stride(0),), None,
                   replace(config, programs_per_sm=0), HAS_SCALE=False, GATED=True, **pdl_args(x))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bias: torch.Tensor | None, config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` @ dequant(packed)^T + bias; groups of GROUP along K."""
    group = x.shape[-1] // scale.shape[1]
    assert group == GROUP, f"the int4 kernel takes groups of {GROUP}, got {group}"
    words = packed.view(torch.int32)    # little-endian: byte 4w + b is bits 8b.. of word w
    weights = (words, scale, zero), (words.stride(0), scale.stride(0))
    if x.numel() == x.shape[-1] and x.dtype in HALF2_MAGICS:     # one row, read as 32-bit pairs
        x = x if x.data_ptr() % 4 == 0 else x.clone()
        return _launch(_int4_gemv_kernel, "int4", x, packed.shape[0], *weights, bias, config,
                       (HALF2_MAGICS[x.dtype],), GROUP=GROUP)
    if x.numel() == x.shape[-1]:    # an fp32 row: the tensor-core tiles (the GEMV's decoding is bf16/fp16)
        config = SMALL["int4"]
    return _launch(_int4_kernel, "int4", x, packed.shape[0], *weights, bias, config, GROUP=GROUP)


def quantize_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (times ``input_scale [K]`` in x's dtype) -> (``q int8 [M, K]``, ``scale fp32 [M]``), bit for
    bit ``torch_quant.quantize_per_token(x * input_scale.to(x.dtype))``, in one launch."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, input_scale if input_scale is not None else x, q, scale, k, x.stride(0),
                                q.stride(0), BLOCK_K=block_k, HAS_INPUT_SCALE=input_scale is not None,
                                num_warps=max(4, min(16, block_k // 1024)))
    return q, scale


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None = None, config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` (times ``input_scale``) quantized per row, times int8 ``q [N, K]`` exactly, scaled by
    both scales (+ bias), in x's dtype: ``torch_quant.w8a8_linear(x * input_scale.to(x.dtype), q, scale,
    bias)`` up to the output rounding (here once, in fp32, bias included). Two launches (three with a
    split K), for any number of rows."""
    qx, xscale = quantize_per_token(x.reshape(-1, x.shape[-1]), input_scale)
    out = _launch(_w8a8_kernel, "w8a8", qx, q.shape[0], (q, scale, xscale), (q.stride(0),), bias, config,
                  out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], -1)


DEQUANT_BLOCK = (16, 256)     # rows x values a program of ``dequantize`` writes


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr):
    """Stored rows -> floats in out's dtype, bit for bit the torch twin's: ``q * scale`` (int8) or
    ``(q - zero) * scale`` (int4) in fp32, rounded once. int4 weight ``r`` of a run of 128 is nibble
    ``j = 4 (r % 2) + r // 32`` of word ``(r % 32) // 2`` (``torch_quant.pack_int4``), low half of byte
    ``j // 2`` for even ``j``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < N) & (ks[None, :] < K)
    if INT4:     # groups of GROUP weights, each one run of the packing
        r = ks % GROUP
        nibble = 4 * (r % 2) + r // 32
        byte = ks // GROUP * (GROUP // 2) + (r % 32) // 2 * 4 + nibble // 2
        codes = tl.load(q_ptr + rows[:, None] * stride_qn + byte[None, :], mask=ok, other=0).to(tl.int32)
        q = ((codes >> (4 * (nibble % 2))[None, :]) & 0xF).to(tl.float32)
        groups = rows[:, None] * stride_sn + (ks // GROUP)[None, :]
        zero = tl.load(zero_ptr + groups, mask=ok, other=0).to(tl.float32)
        w = (q - zero) * tl.load(scale_ptr + groups, mask=ok, other=0.0).to(tl.float32)
    else:
        q = tl.load(q_ptr + rows[:, None] * stride_qn + ks[None, :], mask=ok, other=0).to(tl.float32)
        w = q * tl.load(scale_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_on + ks[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows of int8 codes ``q [N, K]`` (scale per row), or of packed int4 ``q [N, K/2]`` with ``zero``
    (scale and zero per group), as ``dtype [N, K]``: the torch twins' values (``torch_quant.dequantize_int8``
    / ``dequantize_int4``) with each code read once and each value written once, where the twins' float
    passes move ~19 bytes a value (the long prefill steps of weight-only formats dequantize every matrix)."""
    int4 = zero is not None
    n, k = q.shape[0], q.shape[1] * (2 if int4 else 1)
    if int4 and zero.stride(0) != scale.stride(0):
        zero = zero.contiguous()
        scale = scale.contiguous()
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    block_n, block_k = DEQUANT_BLOCK
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        q, scale, zero if int4 else scale, out, n, k, q.stride(0), scale.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, INT4=int4, GROUP=GROUP, num_warps=4)
    return out
