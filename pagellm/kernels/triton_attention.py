"""Paged attention in Triton: KV write, split-KV decode, varlen (chunked) prefill.

Layouts are those of :mod:`pagellm.kernels.attention`: ``q [T, H, D]``, caches
``[num_blocks, block_size, Hkv, D]``, one block-table row per sequence. Every
kernel reads the K/V of a tile of keys by looking up, key by key, the pool
block that holds it (``block_tables[b, key // block_size]``), so a key tile
need not line up with the cache's blocks and any power-of-two block size works.

``attend`` routes each sequence by its query length, with no host sync:

* **decode** (query_len == 1), flash-decoding: grid ``(B, Hkv, num_splits)``
  (or ``(Hkv, B, num_splits)``, ``heads_inner``); a program loads the
  ``H / Hkv`` query heads of one KV head as the rows of a matrix (padded to 16
  for the tensor cores), so each K/V tile is read once per group, and walks its
  share of the sequence's keys with an online softmax. Each sequence's visible
  keys (its window, or all of them) are cut into ``num_splits`` equal runs;
  with one split the kernel writes the output, otherwise it writes the partial
  (max, sum, normalised out) per split and a second kernel merges them. Only a
  run's first and last tiles can hold keys it must not see: the tiles between
  skip the mask (as prefill's do).
* **prefill** (query_len > 1), FlashAttention-2 style: grid
  ``(T // BLOCK_M + B, H)``, one program per tile of ``BLOCK_M`` queries of one
  sequence and one head. Sequence b's tiles are numbered from
  ``query_start_loc[b] // BLOCK_M + b``, which bounds the tiles before it, so a
  program finds its sequence by binary search over ``query_start_loc``; spare
  programs return at once, and the grid runs the last (longest) tiles first.
  Key tiles fully inside the causal/window band skip the mask; only the tiles
  on its edges compute it, and they never read a cache slot outside the band
  (so stale blocks below a sliding window may hold anything).

Numbers: fp32 accumulation, scores in the log2 domain (``exp2``), fp16 or bf16
inputs. Head dims must be powers of two, at least 32 (64 and 128 are checked on
device).

Every tile step splits the head dim in two halves (two dots where there was
one): a float cache into its first and second halves, a quantized one into its
even and odd dims, which is how its codes arrive (below).

Quantized cache (``kernels.kv_quant``: int8 or fp8 codes, one fp16 scale per
token per KV head, a token's K and V scales adjacent in memory): the write
kernel quantizes each token's head vector as it stores it. The attention
kernels make no float copy of the cache; per tile they

* copy the codes two to an int16 (16-byte asynchronous copies, as a bf16 tile's)
  and turn each int16 into an even-dim and an odd-dim fp16 code in registers
  with byte permutes (inline PTX, ``INT8_TO_FP16``, ``E4M3_TO_FP16``): exact,
  and no integer-to-float conversion unit;
* run the dots in fp16 (queries scaled by a power of two per row, to fit);
* read a key's K and V scales as one int32, a load the pipeliner issues ahead
  with the code tiles (a 2-byte load a key stays synchronous: its latency was
  paid every tile);
* apply the K scales to the scores and split each V scale into a power of two,
  added to the score's exponent, and a mantissa in [1, 2) on the probability,
  so the fp16 probabilities stay in range however small the scales.

Why: the earlier kernel (codes converted to bf16 by ``.to``, joined back into
dim order, scales loaded 2 bytes a key) ran the int8 decode at 0.94x of the
bf16 kernel's speed at 64 x 4k on an H200 although it read half the bytes: its
compiled loop sent the converted V tile through shared memory (the join), spent
2.4 instructions a code converting, and waited on the two scale loads every
tile. This one ran it at 1.44x (0.73 of copy bandwidth) with 128-key tiles, 4
warps and 3 stages, a loop Triton 3.6 does not overlap: below 5 stages its
pipeliner gives the code tiles one shared-memory buffer, so each tile's copies
are issued after the previous tile's math and waited out before its own. Now
(an H200 sweep, ``benchmarks/kv_quant_gpu.py``): 5 stages, so the next tile's
codes and scales are in flight during a tile's math (two buffers); 64-key tiles
on 2 warps (939 instructions a warp for 64 keys in the unmasked loop, against
4 warps' 634: 29 instructions a key a program instead of 40, 4 programs an SM);
no mask on the tiles inside a split; programs of one token's KV heads launched
together (``heads_inner``). Then fewer instructions in that loop (sm_90 SASS,
Triton 3.6): int8 keys keep their +1152 (``INT8_BIASED_TO_FP16``; each row's
``q . 1152`` comes off in the FFMA that applies the factor), 939 -> 875; key
addresses from unsigned 32-bit block ids and slots computed once
(``_row_pointers``), 875 -> 769; and one split at 64 x 4k (512 programs, one
wave at 4 an SM, where 2 splits ran two waves and a merge). int8 decode at
64 x 4k: 1.76x the bf16 kernel, 0.89 of copy bandwidth (256 x 2k: 0.93; the
kernel before these last steps, same run: 0.83 and 0.90).

The quantized prefill is slower than before the even/odd split (160 to 117
TFLOP/s; bf16 275 to 321) and tiles with two shared-memory buffers (5 stages)
did not help (93-102). Unlike the bf16 kernel's, its wgmma operands (the
converted K and V tiles) are written from registers to shared memory every tile,
and each such write is followed by a ``fence.proxy.async`` (SASS ``MEMBAR.ALL.CTA``,
four a tile), which may wait for the tile copies already in flight; not
confirmed on the device.

CUDA graphs: the decode path launches with a grid fixed by the batch size and
the split count, and the split count depends only on (batch size, Hkv,
``meta.max_seq_len``, the device's SM count). The engine pads
``meta.max_seq_len`` to its fixed bound while capturing, so a captured graph
replays correctly for any lengths up to that bound: each program derives its
key range from ``seq_lens`` on the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import os

import torch
import triton
import triton.language as tl

from pagellm.kernels import triton_ops
from pagellm.kernels.attention import AttentionMetadata, LayerKVCache
from pagellm.kernels.kv_quant import SCALE_DTYPE, SCALE_MIN, format_of
from pagellm.kernels.triton_ops import pdl_args, rotate_heads, wait_for_producer

LOG2_E = 1.4426950408889634
# Stands in for "no sliding window": larger than any sequence, small enough
# that ``position - window`` cannot overflow int32.
NO_WINDOW = 1 << 30
# Initial running max: finite, so a row whose keys are all masked in a tile
# gets exp2(-inf - NEG_BIG) = 0 rather than NaN.
NEG_BIG = tl.constexpr(-1.0e30)
MIN_SCALE = tl.constexpr(SCALE_MIN)

MIN_GROUP_ROWS = 16            # tl.dot needs at least 16 rows
# Split policy: aim for this many decode programs per SM, with no split
# shorter than MIN_KEYS_PER_SPLIT keys and at most MAX_KV_SPLITS splits.
DECODE_PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 64
MAX_KV_SPLITS = 32
# Decode tiles (keys per tile), warps, pipeline stages, the split policy's
# programs per SM and most splits, the grid order (``_decode_kernel``'s HEADS_INNER)
# and a cap on registers a thread (None: the compiler's choice).
# The bf16 kernel's heads-inner order and more splits were within 1-2% in the
# sweep of h200-2026-12-02-kv-quant-kernel.json: left as they were.
DECODE = dict(block_n=64, num_warps=4, num_stages=3, programs_per_sm=DECODE_PROGRAMS_PER_SM,
              max_splits=MAX_KV_SPLITS, heads_inner=False, maxnreg=None)
# A quantized cache's decode: its own (a tile carries half the bytes), from
# sweeps on an H200 (benchmarks/kv_quant_gpu.py, h200-2026-12-02-kv-quant-kernel.json,
# h200-2026-12-02-kv-quant-decode-sass.json: a cap of 200 registers, 5 programs an
# SM, was slower at 2 and 4 splits).
QUANT_DECODE = dict(block_n=64, num_warps=2, num_stages=5, programs_per_sm=4, max_splits=32, heads_inner=True,
                    maxnreg=None)

PREFILL = dict(block_m=128, block_n=128, num_warps=8, num_stages=2)
# A quantized cache's prefill tiles (its key tiles are converted in registers and
# staged through shared memory for the tensor cores), from the same sweep.
QUANT_PREFILL = dict(block_m=128, block_n=64, num_warps=4, num_stages=3)

WRITE_KV_NUM_WARPS = 4
# The rotary embedding inside the KV write kernel (one launch per layer fewer; off: benchmarks' "before").
FUSED_ROTARY = True


# --------------------------------------------------------------------------- write_kv

@triton.jit
def _store_head_vectors(src_ptr, cache_ptr, scale_ptr, dst, scale_dst, head_ok,
                        QUANT: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
    """Store ``[HEADS_PAD, D]`` vectors; quantized: codes (rounded to integers
    when ``ROUND``: int8) and one fp16 scale per head."""
    mask = head_ok[:, None]
    x = tl.load(src_ptr, mask=mask, other=0.0)
    if QUANT:
        xf = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(xf), axis=1) / QMAX, MIN_SCALE).to(tl.float16)
        tl.store(scale_ptr + scale_dst, scale, mask=head_ok)
        xf = xf / scale.to(tl.float32)[:, None]
        if ROUND:
            xf = tl.where(xf >= 0, tl.floor(xf + 0.5), -tl.floor(0.5 - xf))
        x = tl.minimum(tl.maximum(xf, -QMAX), QMAX)
    tl.store(cache_ptr + dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                     q_ptr, positions_ptr, cos_sin_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cache_block, stride_cache_token, stride_cache_head,
                     stride_scale_block, stride_scale_head, stride_scale_token,
                     stride_qt, stride_qh, stride_cos_sin,
                     block_size, num_kv_heads, num_q_heads, half,
                     HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                     ROUND: tl.constexpr, ROTATE: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                     HALF_PAD: tl.constexpr, PDL: tl.constexpr):
    """One program per token: store its ``[Hkv, D]`` K and V into slot
    ``slot_mapping[t]``; with ``ROTATE``, first apply the rotary embedding to its
    q and k heads in place (``triton_ops.rotary``'s math, one launch fewer)."""
    wait_for_producer(PDL)
    token = tl.program_id(0)
    if ROTATE:
        pos = tl.load(positions_ptr + token).to(tl.int64)
        half_dims = tl.arange(0, HALF_PAD)
        table = cos_sin_ptr + pos * stride_cos_sin + half_dims
        cos = tl.load(table, mask=half_dims < half, other=0.0).to(tl.float32)
        sin = tl.load(table + half, mask=half_dims < half, other=0.0).to(tl.float32)
        t64 = token.to(tl.int64)
        rotate_heads(q_ptr, t64, cos, sin, stride_qt, stride_qh, num_q_heads, half, Q_HEADS_PAD, HALF_PAD)
        rotate_heads(k_ptr, t64, cos, sin, stride_kt, stride_kh, num_kv_heads, half, HEADS_PAD, HALF_PAD)
        tl.debug_barrier()      # the rotated k is read back below, by other threads of the program
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    head_ok = heads < num_kv_heads
    dst = block * stride_cache_block + offset * stride_cache_token + heads[:, None] * stride_cache_head + dims[None, :]
    scale_dst = block * stride_scale_block + heads * stride_scale_head + offset * stride_scale_token
    _store_head_vectors(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], k_cache_ptr,
                        k_scale_ptr, dst, scale_dst, head_ok, QUANT=QUANT, QMAX=QMAX, ROUND=ROUND)
    _store_head_vectors(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], v_cache_ptr,
                        v_scale_ptr, dst, scale_dst, head_ok, QUANT=QUANT, QMAX=QMAX, ROUND=ROUND)


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding ``write_kv`` applies first: to ``q [T, H, D]`` and k, in
    place, at ``positions [T]`` from ``cos_sin_cache [max_position, rotary_dim]``."""
    q: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None, rotation: Rotation | None = None) -> None:
    """Scatter ``k, v [T, Hkv, D]`` into the paged caches, quantized when they
    hold a ``kv_quant`` format (scales into ``k_scale``, ``v_scale``); slot -1
    writes nothing. With ``rotation``, q and k are rotated first, in the same launch."""
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_cache_layout(k_cache, v_cache)
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    if num_tokens == 0:
        return
    fmt = format_of(k_cache.dtype)
    if fmt is None:
        k_scale = v_scale = torch.empty(1, 1, 1, dtype=SCALE_DTYPE, device=k_cache.device)   # unused
    assert k_scale is not None and v_scale is not None and k_scale.stride() == v_scale.stride()
    # Without a rotation the kernel never reads these; any tensors of the right rank stand in.
    q, positions, cos_sin = ((rotation.q, rotation.positions, rotation.cos_sin_cache) if rotation
                             else (k, slot_mapping, k))
    assert q.stride(2) == 1 and cos_sin.stride(-1) == 1
    half = cos_sin.shape[1] // 2 if rotation else 1
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, q, positions, cos_sin,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *k_scale.stride(),
        q.stride(0), q.stride(1), cos_sin.stride(0),
        k_cache.shape[1], num_kv_heads, q.shape[1], half,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        QUANT=fmt is not None, QMAX=fmt.qmax if fmt is not None else 0.0,
        ROUND=fmt is not None and fmt.storage == torch.int8, ROTATE=rotation is not None,
        Q_HEADS_PAD=triton.next_power_of_2(q.shape[1]), HALF_PAD=triton.next_power_of_2(half),
        num_warps=WRITE_KV_NUM_WARPS, **pdl_args(k))


def _scale_pairs(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """(the cache's ``kv_quant`` format or None, its scales as int32 (K, V) pairs
    ``[num_blocks, Hkv, block_size]``, or a stand-in for a float cache)."""
    fmt = format_of(k_cache.dtype)
    if fmt is None:
        return None, torch.empty(1, 1, 1, dtype=torch.int32, device=k_cache.device)
    assert k_scale is not None and v_scale is not None and k_scale.stride() == v_scale.stride()
    assert v_scale.data_ptr() == k_scale.data_ptr() + 2 and k_scale.stride(2) == 2, \
        "K and V scales must be adjacent pairs (kv_quant.scale_pairs)"
    pairs = torch.as_strided(k_scale, (*k_scale.shape, 2), (*k_scale.stride(), 1))
    return fmt, pairs.view(torch.int32).squeeze(-1)


# --------------------------------------------------------------------------- shared tile step

@triton.jit
def _half_dims(HALF: tl.constexpr, CODES: tl.constexpr):
    """Head dims of the two halves a tile is split into: codes read two to an
    int16 give the even dims (low bytes) and the odd dims (high bytes); a float
    cache is split into its first and second halves."""
    halves = tl.arange(0, HALF)
    if CODES:
        return 2 * halves, 2 * halves + 1
    return halves, halves + HALF


@triton.jit
def _load_rows(ptrs, in_seq, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=in_seq[:, None], other=0)
    return tl.load(ptrs)


@triton.jit
def _row_pointers(cache_ptr, block, stride_block, row_offset, IN_BYTES: tl.constexpr):
    """Pointers to each key's row in the cache: ``block [BLOCK_N]`` (ids, which
    are non-negative int32) times ``stride_block``, plus ``row_offset`` (the row's
    place in its block, computed once outside the loop), both in elements.
    Unsigned 32-bit factors make the 64-bit product one multiply (signed ones took
    sign extensions and a second multiply). ``IN_BYTES``: the arithmetic in bytes,
    so the product is also one multiply-add with the base pointer and offset as
    its addend (no scaling by the element size, no 64-bit adds): 7 instructions a
    key for K and V in the int8 decode loop instead of 9; the bf16 kernel keeps
    element offsets, whose addends would cost it 22 more registers (80 -> 102 on
    4 warps: 6 programs an SM -> 4)."""
    block = block.to(tl.uint32, bitcast=True).to(tl.uint64)
    if IN_BYTES:
        ELEMENT_BYTES: tl.constexpr = cache_ptr.dtype.element_ty.primitive_bitwidth // 8
        rows = cache_ptr.to(tl.pointer_type(tl.int8)) + row_offset * ELEMENT_BYTES
        rows += block * (stride_block * ELEMENT_BYTES).to(tl.uint32)
        return rows.to(cache_ptr.dtype)
    return cache_ptr + row_offset + block * stride_block.to(tl.uint32)


# Codes -> fp16 in registers, two int16 (four codes) an instruction group. int8:
# each byte with its sign bit flipped becomes the low byte of fp16 1024 + (code +
# 128) = code + 1152 (``INT8_BIASED_TO_FP16``, what the key tiles take: the bias
# comes off each row's scores, ``_prepare_q``), and ``INT8_TO_FP16`` subtracts it
# (value tiles). e4m3: sign, exponent and mantissa moved into fp16's fields
# (exponent bias 15, not 7) give code / 256, exactly, subnormals too; the 256 is
# folded into the scales (``_code_unit``).
INT8_BIAS = tl.constexpr(1152.0)
_INT8_PLUS_1152 = """xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64646464;
prmt.b32 $0, t, m, 0x4240;
prmt.b32 $1, t, m, 0x4341;"""
INT8_BIASED_TO_FP16 = tl.constexpr("{\n.reg .b32 t, m;\n" + _INT8_PLUS_1152 + "\n}")
INT8_TO_FP16 = tl.constexpr("{\n.reg .b32 t, m, c;\n" + _INT8_PLUS_1152 + """
mov.b32 c, 0x64806480;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")
E4M3_TO_FP16 = tl.constexpr("""{
.reg .b32 lo, hi, z, s;
mov.b32 z, 0;
prmt.b32 lo, $2, z, 0x2404;
prmt.b32 hi, $2, z, 0x3414;
shr.b32 s, lo, 1;
and.b32 s, s, 0x3F803F80;
and.b32 lo, lo, 0x80008000;
or.b32 $0, lo, s;
shr.b32 s, hi, 1;
and.b32 s, s, 0x3F803F80;
and.b32 hi, hi, 0x80008000;
or.b32 $1, hi, s;
}""")
# Triton's interpreter (CPU checks) cannot run PTX: it takes the plain conversions.
ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _fp16_pairs(x, CONVERSION: tl.constexpr):
    """Inline PTX ``CONVERSION`` of each int16 to two fp16 (``$0``, ``$1``), two int16 a group."""
    return tl.inline_asm_elementwise(CONVERSION, "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True,
                                     pack=2)


@triton.jit
def _codes_to_fp16(x, FP8: tl.constexpr, BIASED: tl.constexpr):
    """int16 holding two codes (little-endian: the even dim in the low byte) ->
    (even-dim, odd-dim) codes as exact fp16: int8 codes as themselves (``BIASED``:
    plus ``INT8_BIAS``), e4m3 as code / 256."""
    if ASM:
        if FP8:
            return _fp16_pairs(x, E4M3_TO_FP16)
        if BIASED:
            return _fp16_pairs(x, INT8_BIASED_TO_FP16)
        return _fp16_pairs(x, INT8_TO_FP16)
    lo = x.to(tl.int8)
    hi = (x >> 8).to(tl.int8)
    if FP8:
        return ((lo.to(tl.float8e4nv, bitcast=True).to(tl.float32) / 256).to(tl.float16),
                (hi.to(tl.float8e4nv, bitcast=True).to(tl.float32) / 256).to(tl.float16))
    if BIASED:
        return lo.to(tl.float16) + INT8_BIAS, hi.to(tl.float16) + INT8_BIAS
    return lo.to(tl.float16), hi.to(tl.float16)


@triton.jit
def _load_halves(row_ptrs, in_seq, dtype: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr,
                 CODES: tl.constexpr, FP8: tl.constexpr, BIASED: tl.constexpr = False):
    """The ``[BLOCK_N, HALF]`` halves (``_half_dims``) of a K or V tile: floats in
    ``dtype``, or codes as fp16 (``_codes_to_fp16``, int8 ``BIASED`` or not). Codes are loaded two to an
    int16, so the asynchronous copies move 16 bytes at a time, and split in
    registers: no join or reshape, whose layouts would send the tile through
    shared memory."""
    ptrs = row_ptrs[:, None] + tl.arange(0, HALF)[None, :]
    x = _load_rows(ptrs, in_seq, MASKED)
    if CODES:
        return _codes_to_fp16(x, FP8, BIASED)
    return x.to(dtype), _load_rows(ptrs + HALF, in_seq, MASKED).to(dtype)


@triton.jit
def _code_unit(FP8: tl.constexpr):
    """What one unit of ``_codes_to_fp16``'s output is worth in codes."""
    if FP8:
        return 256.0
    return 1.0


@triton.jit
def _power_of_two_below(x):
    """``(e, 2^e, 2^-e)`` for ``x >= 0`` in fp32, ``2^e <= x < 2^(e + 1)``, all exact
    (built from the exponent bits; ``x = 0`` gives ``(-127, 0, 2^127)``)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7F800000
    e = ((bits >> 23) | 0x4B000000).to(tl.float32, bitcast=True) - 8388735.0    # 2^23 + 127
    return e, bits.to(tl.float32, bitcast=True), (0x7F000000 - bits).to(tl.float32, bitcast=True)


@triton.jit
def _prepare_q(q_a, q_b, scale_log2, QUANT: tl.constexpr, FP8: tl.constexpr):
    """The query halves as the dots take them, and each row's factor and bias from
    a dot to log2-domain scores (``dot * factor + bias``). Against codes the dots
    run in fp16: each row is scaled by a power of two (exact) to below 2 in
    magnitude, as bf16 queries may exceed fp16's range; the factor multiplies it
    back, with the codes' unit. int8 keys arrive biased (``INT8_BIAS`` added to
    every code): the bias takes ``q . INT8_BIAS`` off the row's dots (the sum of the
    fp16 query, in fp32: within 2^-24 of ``q``'s magnitudes, as the dot's own sums)."""
    zero = tl.zeros([q_a.shape[0]], dtype=tl.float32)
    if QUANT:
        q_max = tl.maximum(tl.max(tl.abs(q_a.to(tl.float32)), axis=1), tl.max(tl.abs(q_b.to(tl.float32)), axis=1))
        _, power, inverse = _power_of_two_below(q_max)
        q_a = (q_a.to(tl.float32) * inverse[:, None]).to(tl.float16)
        q_b = (q_b.to(tl.float32) * inverse[:, None]).to(tl.float16)
        factor = power * (scale_log2 * _code_unit(FP8))
        if FP8:
            return q_a, q_b, factor, zero
        q_sum = tl.sum(q_a.to(tl.float32), axis=1) + tl.sum(q_b.to(tl.float32), axis=1)
        return q_a, q_b, factor, -(q_sum * INT8_BIAS) * factor
    return q_a, q_b, zero + scale_log2, zero


@triton.jit
def _load_scales(pair_ptrs):
    """fp32 (K, V) scales from their int32 pairs (the K scale in the low half):
    one 4-byte load a key, which the pipeliner issues ahead like the code tiles."""
    pair = tl.load(pair_ptrs)
    k_scale = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    v_scale = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return k_scale.to(tl.float32), v_scale.to(tl.float32)


@triton.jit
def _attend_key_tile(acc_a, acc_b, l_i, m_i, q_a, q_b, q_factor, q_bias, q_pos, key_start, key_lo, key_hi, window,
                     k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset, stride_cache_block,
                     stride_cache_token, scale_ptr, scale_head_offset, stride_scale_block,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr,
                     QUANT: tl.constexpr, FP8: tl.constexpr):
    """One online-softmax step of rows ``q [M, D]`` (at positions ``q_pos [M]``)
    over keys ``key_start .. key_start + BLOCK_N - 1`` (a multiple of BLOCK_N).
    The head dim is split in two halves (``_half_dims``): ``q_a``/``q_b`` and the
    accumulators ``acc_a``/``acc_b`` hold them; ``q . k`` is the sum of the
    halves' dots, times ``q_factor`` (``_prepare_q``).

    Unmasked tiles must lie wholly inside every row's causal window. Masked
    tiles read only keys in ``[key_lo, key_hi)`` (cache slots outside it may
    hold anything, NaN included) and apply ``pos - window < key <= pos``.

    Quantized (``QUANT``): K and V are codes with per-key scales. The K scales
    multiply the scores. A V scale ``2^e * f`` (``1 <= f < 2``) is split: ``e``
    joins the score, so the running max ``m_i`` is over ``t = score + e``; the
    dot takes ``exp2(t - m) * f`` (below 2: fp16-safe however small the scales)
    and the sum ``l_i`` adds ``exp2(t - m) * 2^-e``, so ``acc / l`` is the output.
    """
    key_start = tl.multiple_of(key_start, BLOCK_N)
    in_tile = tl.arange(0, BLOCK_N)
    keys = key_start + in_tile
    in_seq = (keys >= key_lo) & (keys < key_hi)
    # Both powers of two, key_start >= 0 a multiple of BLOCK_N: a key's block-table
    # entry and slot split into the tile's (scalar) and the key's place in it
    # (the same every tile: computed once).
    entries = block_table_ptr + key_start // BLOCK_SIZE + in_tile // BLOCK_SIZE
    if BLOCK_N >= BLOCK_SIZE:
        slots = in_tile % BLOCK_SIZE
    else:
        slots = key_start % BLOCK_SIZE + in_tile
    if MASKED:
        block = tl.load(entries, mask=in_seq, other=0)
    else:
        block = tl.load(entries)
    row_offset = slots * stride_cache_token + kv_head_offset
    k_a, k_b = _load_halves(_row_pointers(k_cache_ptr, block, stride_cache_block, row_offset, QUANT), in_seq,
                            q_a.dtype, HALF, MASKED, QUANT, FP8, BIASED=QUANT and not FP8)
    v_a, v_b = _load_halves(_row_pointers(v_cache_ptr, block, stride_cache_block, row_offset, QUANT), in_seq,
                            q_a.dtype, HALF, MASKED, QUANT, FP8)
    scores = tl.dot(q_b, tl.trans(k_b), tl.dot(q_a, tl.trans(k_a)))
    if QUANT and not FP8:
        scores = scores * q_factor[:, None] + q_bias[:, None]      # one FFMA: the keys' bias off
    else:
        scores = scores * q_factor[:, None]
    if QUANT:
        # A masked key's block is 0, a valid one: the load needs no mask, and vectorizes.
        k_scale, v_scale = _load_scales(_row_pointers(scale_ptr, block, stride_scale_block,
                                                      scale_head_offset + slots, True))
        scores = scores * k_scale[None, :]
        if MASKED:      # a slot outside the sequence may hold any scale, NaN included
            v_scale = tl.where(in_seq, v_scale, 1.0)
        v_exp, _, v_inverse = _power_of_two_below(v_scale * _code_unit(FP8))
    if MASKED:
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible & in_seq[None, :], scores, float("-inf"))
    if QUANT:
        scores = scores + v_exp[None, :]

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    if QUANT:
        l_i = l_i * alpha + tl.sum(p * v_inverse[None, :], axis=1)
        p = p * (v_scale * _code_unit(FP8) * v_inverse)[None, :]
    else:
        l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(q_a.dtype)
    acc_a = tl.dot(p, v_a, acc_a * alpha[:, None])
    acc_b = tl.dot(p, v_b, acc_b * alpha[:, None])
    return acc_a, acc_b, l_i, m_new


@triton.jit
def _attend_runs(acc_a, acc_b, l_i, m_i, q_a, q_b, q_factor, q_bias, q_pos, lo, full_lo, full_hi, hi, key_lo, window,
                 k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset, stride_cache_block,
                 stride_cache_token, scale_ptr, scale_head_offset, stride_scale_block,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, QUANT: tl.constexpr,
                 FP8: tl.constexpr, EDGE_STAGES: tl.constexpr):
    """``_attend_key_tile`` over the tiles from ``lo`` (a multiple of BLOCK_N) up
    to key ``hi`` (exclusive), visible keys from ``key_lo``, in three runs: the
    band's lower edge (masked), the tiles of ``[full_lo, full_hi)`` (multiples
    of BLOCK_N; every key of them visible to every row: no mask, no masked
    loads), the upper edge (masked). Every non-empty run starts at a multiple
    of BLOCK_N. The edge runs' loops are pipelined with ``EDGE_STAGES`` (None:
    the kernel's ``num_stages``): a decode split has at most one tile in each,
    and pipelining it costs registers (sm_90, Triton 3.6, 4 warps: int8 64-key
    tiles at 5 stages take 208 registers a thread with every loop pipelined,
    128 with the edges at 1 stage; bf16 at 3 stages 89, 80 with the edges at 2)."""
    mid_lo = tl.minimum(full_lo, hi)
    mid_hi = tl.maximum(mid_lo, full_hi)
    for part in tl.static_range(3):
        if part == 0:
            first, last = lo, mid_lo
        elif part == 1:
            first, last = mid_lo, mid_hi
        else:
            first, last = mid_hi, hi
        for key_start in tl.range(first, last, BLOCK_N, num_stages=None if part == 1 else EDGE_STAGES):
            acc_a, acc_b, l_i, m_i = _attend_key_tile(
                acc_a, acc_b, l_i, m_i, q_a, q_b, q_factor, q_bias, q_pos, key_start, key_lo, hi, window,
                k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset, stride_cache_block, stride_cache_token,
                scale_ptr, scale_head_offset, stride_scale_block,
                BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HALF=HALF, MASKED=part != 1, QUANT=QUANT, FP8=FP8)
    return acc_a, acc_b, l_i, m_i


@triton.jit
def _store_halves(ptr, row_offsets, dims_a, dims_b, out_a, out_b, row_ok):
    """Store the two halves of ``[M, D]`` rows at ``ptr + row_offsets[:, None] + dims``."""
    tl.store(ptr + row_offsets[:, None] + dims_a[None, :], out_a.to(ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(ptr + row_offsets[:, None] + dims_b[None, :], out_b.to(ptr.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------- decode

@triton.jit(do_not_specialize=["window", "num_splits", "group_size", "stride_bt"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, scale_ptr,
                   block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                   out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr,
                   scale_log2, window, num_splits, group_size,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cache_block, stride_cache_token, stride_cache_head, stride_bt,
                   stride_scale_block, stride_scale_head,
                   GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, WRITE_OUTPUT: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr,
                   HEADS_INNER: tl.constexpr, PDL: tl.constexpr):
    """Program (b, kv_head, split), or (kv_head, b, split) with ``HEADS_INNER``
    (programs launched together then read the KV heads of the same tokens):
    attention of sequence b's decode token, for all query heads of ``kv_head``,
    over the split's run of keys.

    Writes the final output when ``WRITE_OUTPUT`` (single split), else the split's
    running max (log2 domain), sum and normalised output into the partial buffers
    ``[B, H, num_splits(, D)]``.
    """
    wait_for_producer(PDL)
    if HEADS_INNER:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        num_heads = tl.num_programs(0) * group_size
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_heads = tl.num_programs(1) * group_size
    split = tl.program_id(2)

    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # This split's keys: an equal share, in whole tiles, of the visible run from
    # its first key rounded down to a tile (tiles start at multiples of BLOCK_N).
    first_key = tl.maximum(seq_len - window, 0)
    first_tile = first_key // BLOCK_N * BLOCK_N
    keys_per_split = tl.cdiv(tl.cdiv(seq_len - first_tile, num_splits), BLOCK_N) * BLOCK_N
    start = first_tile + split * keys_per_split
    end = tl.minimum(start + keys_per_split, seq_len)

    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.arange(0, GROUP_ROWS)
    heads = kv_head * group_size + rows
    head_ok = rows < group_size
    dims_a, dims_b = _half_dims(HALF, QUANT)
    q_rows = token * stride_qt + heads * stride_qh
    q_a = tl.load(q_ptr + q_rows[:, None] + dims_a[None, :], mask=head_ok[:, None], other=0.0)
    q_b = tl.load(q_ptr + q_rows[:, None] + dims_b[None, :], mask=head_ok[:, None], other=0.0)
    q_a, q_b, q_factor, q_bias = _prepare_q(q_a, q_b, scale_log2, QUANT, FP8)
    q_pos = tl.full([GROUP_ROWS], 0, tl.int32) + (seq_len - 1)

    acc_a = tl.zeros([GROUP_ROWS, HALF], dtype=tl.float32)
    acc_b = tl.zeros([GROUP_ROWS, HALF], dtype=tl.float32)
    l_i = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    m_i = tl.full([GROUP_ROWS], NEG_BIG, dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Every key in [key_lo, end) is visible to the decode token: only the first
    # and last tiles of the split can need a mask.
    key_lo = tl.maximum(start, first_key)
    acc_a, acc_b, l_i, m_i = _attend_runs(
        acc_a, acc_b, l_i, m_i, q_a, q_b, q_factor, q_bias, q_pos, start, tl.cdiv(key_lo, BLOCK_N) * BLOCK_N,
        end // BLOCK_N * BLOCK_N, end, key_lo, window, k_cache_ptr, v_cache_ptr, block_table_ptr,
        kv_head * stride_cache_head, stride_cache_block, stride_cache_token,
        scale_ptr, kv_head * stride_scale_head, stride_scale_block,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HALF=HALF, QUANT=QUANT, FP8=FP8,
        EDGE_STAGES=1 if QUANT else 2)     # the fewest registers (``_attend_runs``)

    norm = tl.where(l_i > 0, l_i, 1.0)[:, None]
    if WRITE_OUTPUT:
        _store_halves(out_ptr, token * stride_ot + heads * stride_oh, dims_a, dims_b, acc_a / norm, acc_b / norm,
                      head_ok)
    else:
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=head_ok)
        tl.store(part_sum_ptr + part, l_i, mask=head_ok)
        _store_halves(part_out_ptr, part * HEAD_DIM, dims_a, dims_b, acc_a / norm, acc_b / norm, head_ok)


@triton.jit
def _decode_reduce_kernel(query_start_loc_ptr, out_ptr, part_max_ptr, part_sum_ptr, part_out_ptr,
                          stride_ot, stride_oh,
                          NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    """Program (b, head): merge the splits' partial softmaxes into the output row."""
    wait_for_producer(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - token != 1:
        return
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    m = tl.load(part_max_ptr + part)
    weight = tl.exp2(m - tl.max(m, axis=0)) * tl.load(part_sum_ptr + part)
    total = tl.sum(weight, axis=0)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                  programs_per_sm: int = DECODE_PROGRAMS_PER_SM, max_splits: int = MAX_KV_SPLITS) -> int:
    """Splits per sequence for decode: the largest power of two that keeps the
    grid within about ``programs_per_sm`` programs per SM (one wave at this
    kernel's occupancy), leaves no split shorter than ``MIN_KEYS_PER_SPLIT``
    keys of the longest sequence, and is at most ``max_splits``. On an H100
    (132 SMs, 8 KV heads, the defaults): batch 1 -> 32, 8 -> 8, 64 and more -> 1
    (fewer for short contexts)."""
    wanted = max(programs_per_sm * num_sms // max(num_seqs * num_kv_heads, 1), 1)
    by_length = triton.cdiv(max(max_seq_len, 1), MIN_KEYS_PER_SPLIT)
    limit = min(wanted, by_length, max_splits)
    return 1 << (limit.bit_length() - 1)   # largest power of two <= limit


def _as_tiles(cache: torch.Tensor, fmt) -> torch.Tensor:
    """What the attention kernels load: a quantized cache's codes two to an int16."""
    return cache if fmt is None else cache.view(torch.int16)


def _is_fp8(fmt) -> bool:
    return fmt is not None and fmt.storage != torch.int8


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, sliding_window: int | None, out: torch.Tensor,
                     num_splits: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, **tiling) -> None:
    """Write ``out`` rows of the sequences whose query length is 1 (others untouched).
    ``tiling`` overrides the defaults (``DECODE``, quantized ``QUANT_DECODE``)."""
    _, num_heads, head_dim = q.shape
    num_seqs = meta.num_seqs
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    fmt, scales = _scale_pairs(k_cache, k_scale, v_scale)
    t = dict(DECODE if fmt is None else QUANT_DECODE) | tiling
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs, num_kv_heads, meta.max_seq_len, _num_sms(q.device.index or 0),
                                   t["programs_per_sm"], t["max_splits"])
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    write_output = num_splits == 1
    if write_output:
        part_max = part_sum = part_out = out   # unused placeholders
    else:
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    window = NO_WINDOW if sliding_window is None else sliding_window
    k_cache, v_cache = _as_tiles(k_cache, fmt), _as_tiles(v_cache, fmt)
    grid = (num_kv_heads, num_seqs) if t["heads_inner"] else (num_seqs, num_kv_heads)
    _decode_kernel[(*grid, num_splits)](
        q, k_cache, v_cache, scales, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        out, part_max, part_sum, part_out,
        scale * LOG2_E, window, num_splits, group_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        scales.stride(0), scales.stride(1),
        GROUP_ROWS=max(MIN_GROUP_ROWS, triton.next_power_of_2(group_size)), HEAD_DIM=head_dim,
        BLOCK_N=t["block_n"], BLOCK_SIZE=k_cache.shape[1], WRITE_OUTPUT=write_output, QUANT=fmt is not None,
        FP8=_is_fp8(fmt), HEADS_INNER=t["heads_inner"], num_warps=t["num_warps"], num_stages=t["num_stages"],
        maxnreg=t["maxnreg"], **pdl_args(q))
    if not write_output:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            meta.query_start_loc, out, part_max, part_sum, part_out,
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, num_warps=4, **pdl_args(q))


# --------------------------------------------------------------------------- prefill

@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_M: tl.constexpr):
    """Largest b with ``query_start_loc[b] // BLOCK_M + b <= tile`` (binary search)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["window", "num_seqs", "group_size", "stride_bt"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, scale_ptr,
                    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                    out_ptr, scale_log2, window, num_seqs, group_size,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cache_block, stride_cache_token, stride_cache_head, stride_bt,
                    stride_scale_block, stride_scale_head,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr):
    """Program (tile, head): ``BLOCK_M`` queries of one sequence (query_len > 1)
    against its cached keys, FlashAttention-2 style."""
    # Last tiles first: they see the most keys, so the long programs start early.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group_size

    seq = _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_row = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if (q_len <= 1) | (first_row >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    HALF: tl.constexpr = HEAD_DIM // 2
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims_a, dims_b = _half_dims(HALF, QUANT)
    tokens = (q_start + rows).to(tl.int64)
    q_rows = tokens * stride_qt + head * stride_qh
    q_a = tl.load(q_ptr + q_rows[:, None] + dims_a[None, :], mask=row_ok[:, None], other=0.0)
    q_b = tl.load(q_ptr + q_rows[:, None] + dims_b[None, :], mask=row_ok[:, None], other=0.0)
    q_a, q_b, q_factor, q_bias = _prepare_q(q_a, q_b, scale_log2, QUANT, FP8)
    q_pos = context_len + rows

    # Keys [key_lo, hi) are visible to some row, the tiles of [full_lo, full_hi)
    # to every row; the runs start at key_lo rounded down to a tile.
    first_pos = context_len + first_row
    last_pos = context_len + tl.minimum(first_row + BLOCK_M, q_len) - 1
    key_lo = tl.maximum(first_pos - window + 1, 0)
    lo = key_lo // BLOCK_N * BLOCK_N
    full_lo = tl.maximum(tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N, lo)
    full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N

    acc_a = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    acc_a, acc_b, l_i, m_i = _attend_runs(
        acc_a, acc_b, l_i, m_i, q_a, q_b, q_factor, q_bias, q_pos, lo, full_lo, full_hi, last_pos + 1, key_lo, window,
        k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head * stride_cache_head, stride_cache_block,
        stride_cache_token, scale_ptr, kv_head * stride_scale_head, stride_scale_block,
        BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HALF=HALF, QUANT=QUANT, FP8=FP8, EDGE_STAGES=None)

    norm = tl.where(l_i > 0, l_i, 1.0)[:, None]
    _store_halves(out_ptr, tokens * stride_ot + head * stride_oh, dims_a, dims_b, acc_a / norm, acc_b / norm, row_ok)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, sliding_window: int | None, out: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, **tiling) -> None:
    """Write ``out`` rows of the sequences whose query length is > 1 (others untouched).
    ``tiling`` overrides the defaults (``block_m``, ``block_n``, ``num_warps``,
    ``num_stages``: ``PREFILL``, quantized ``QUANT_PREFILL``)."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = meta.num_seqs
    group_size = num_heads // k_cache.shape[2]
    window = NO_WINDOW if sliding_window is None else sliding_window
    fmt, scales = _scale_pairs(k_cache, k_scale, v_scale)
    t = dict(PREFILL if fmt is None else QUANT_PREFILL) | tiling
    grid = (num_tokens // t["block_m"] + num_seqs, num_heads)
    k_cache, v_cache = _as_tiles(k_cache, fmt), _as_tiles(v_cache, fmt)
    _prefill_kernel[grid](
        q, k_cache, v_cache, scales, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        out, scale * LOG2_E, window, num_seqs, group_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        scales.stride(0), scales.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_SIZE=k_cache.shape[1],
        QUANT=fmt is not None, FP8=_is_fp8(fmt), num_warps=t["num_warps"], num_stages=t["num_stages"])


# --------------------------------------------------------------------------- backend

def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        "k_cache and v_cache must share shape and strides"
    assert k_cache.stride(3) == 1, "head_dim must be contiguous in the cache"


class TritonAttention:
    """The Triton backend of :class:`pagellm.kernels.attention.AttentionBackend`."""

    name = "triton"
    ops = triton_ops
    fused = True

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        write_kv(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale)

    def rotate_and_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        """One launch (``FUSED_ROTARY``) or the two of ``ops.rotary`` and ``write_kv``."""
        if not FUSED_ROTARY:
            self.ops.rotary(q, k, positions, cos_sin_cache)
            self.write_kv(k, v, cache, slot_mapping)
            return
        write_kv(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale,
                 Rotation(q, positions, cos_sin_cache))

    def attend(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        """Decode tokens go to the split-KV decode kernel; when any sequence has
        more than one query (``meta.max_query_len > 1``) the prefill kernel runs
        too, each skipping the other's sequences. No host sync on either path."""
        head_dim = q.shape[2]
        k_cache, v_cache = cache.k, cache.v
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"triton attention takes fp16 or bf16 queries, got {q.dtype}")
        if head_dim < 32 or head_dim & (head_dim - 1):   # halves of at least 16 dims: tl.dot's minimum
            raise ValueError(f"triton attention needs a power-of-two head_dim >= 32, got {head_dim}; "
                             "use attention_backend='torch'")
        if k_cache.shape[1] & (k_cache.shape[1] - 1):
            raise ValueError(f"triton attention needs a power-of-two block size, got {k_cache.shape[1]}")
        _check_cache_layout(k_cache, v_cache)
        assert q.stride(2) == 1, "head_dim must be contiguous in q"
        out = torch.empty_like(q)
        scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
        decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, out, **scales)
        if meta.max_query_len > 1:
            prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window, out, **scales)
        return out


__all__ = ["TritonAttention", "write_kv", "decode_attention", "prefill_attention", "num_kv_splits"]
