"""Fused dequant matmuls in Triton: each weight byte is read once and
dequantized in registers, never written back. The int8 kernel without its
scales is also the batch-1 GEMV of dense bf16/fp16 weights (``dense_matmul``),
used for the shapes where it beats cuBLAS (``DENSE_GEMV``).

Layouts are those of :mod:`pagellm.kernels.torch_quant` (the reference twins):
int8 ``q [N, K]`` with a scale per row; int4 two codes a byte along K
(``packed [N, K/2]``, even element in the low nibble) with an fp16 scale and a
uint8 zero point per group of ``GROUP`` along K.

One kernel per format serves every shape through its tile sizes
(``MatmulConfig``). Grid ``(cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M))``: a
program owns ``BLOCK_M`` rows, ``BLOCK_N`` output channels and a run of K
tiles. A single row (batch-1 decode) is a GEMV: the tile is multiplied
elementwise and summed, no tensor cores; more rows go through ``tl.dot``
(bf16/fp16 in, fp32 accumulate). With ``split_k == 1`` each program writes its
outputs (bias added) in the activation dtype; a split writes fp32 partial sums
to ``[split_k, M, N]`` that one ``sum`` reduces, so results never depend on the
order programs finish in. ``split_k`` is chosen so that the GPU has several
programs per SM even when N is small (decode is bound by memory bandwidth,
which needs many loads in flight). Launch shapes depend only on (M, N, K), so
the kernels are safe inside CUDA graphs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GROUP = 128     # int4 group size the kernel takes


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int    # split K until the grid has about this many programs per SM (1: no split)


# Chosen on an H200 by `benchmarks/quant_gpu.py --sections sweep` (the fastest sum over the four Llama-3-8B
# projections, replayed as CUDA graphs). LARGE serves decode batches of 17..FUSED_MAX_ROWS rows
# (`quant_ops`); longer prefill chunks go to dequantize + cuBLAS.
GEMV = {"int8": MatmulConfig(1, 4, 2048, 4, 3, 1), "int4": MatmulConfig(1, 8, 2048, 4, 3, 4)}
SMALL = {"int8": MatmulConfig(16, 128, 256, 4, 3, 2), "int4": MatmulConfig(16, 32, 256, 4, 3, 8)}
LARGE = {"int8": MatmulConfig(128, 128, 64, 4, 3, 1), "int4": MatmulConfig(128, 64, 128, 8, 4, 1)}


# Dense bf16 weights at one row, by (N, K): the tiles that beat cuBLAS by 3% or more on an H200 for that
# shape (`benchmarks/graphs_gpu.py`, weights cold in L2 as in a decode step; h200-2026-12-02-graphs.json):
# Llama-3-8B's qkv 14.6 vs 16.5 us, o 11.1 vs 12.6, gate_up 56.3 vs 58.9, down 29.8 vs 31.2 (the LM head,
# 233.7 vs 238.8, stays with cuBLAS). Other shapes stay with cuBLAS until measured.
DENSE_GEMV: dict[tuple[int, int], MatmulConfig] = {
    (6144, 4096): MatmulConfig(1, 2, 2048, 4, 3, 1), (4096, 4096): MatmulConfig(1, 4, 2048, 8, 3, 1),
    (28672, 4096): MatmulConfig(1, 16, 512, 4, 3, 4), (4096, 14336): MatmulConfig(1, 4, 2048, 8, 3, 1)}


def config_for(fmt: str, m: int) -> MatmulConfig:
    return (GEMV if m == 1 else SMALL if m <= 16 else LARGE)[fmt]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_for(config: MatmulConfig, m: int, n: int, k_tiles: int, device_index: int) -> int:
    """Largest power of two <= the K tiles that brings the grid to ~programs_per_sm programs per SM."""
    programs = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
    limit = min(max(1, config.programs_per_sm * _num_sms(device_index) // programs), k_tiles)
    return 1 << (limit.bit_length() - 1)


@triton.jit
def _accumulate(acc, x_ptr, rows, ks, M, K, stride_xm, w, BLOCK_M: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[rows, ks] @ w^T for a dequantized tile ``w [BLOCK_N, BLOCK_K]`` (fp32)."""
    k_ok = ks < K
    if BLOCK_M == 1:
        x = tl.load(x_ptr + tl.program_id(2) * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)[None, :]
    else:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & k_ok[None, :],
                    other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


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


@triton.jit
def _int8_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                 stride_xm, stride_qn, stride_ok, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr = True):
    """int8 codes times per-row scales, or (``HAS_SCALE`` False) a dense float matrix."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        q = tl.load(q_ptr + cols[:, None] * stride_qn + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :],
                    other=0)
        acc = _accumulate(acc, x_ptr, rows, ks, M, K, stride_xm, q.to(tl.float32), BLOCK_M)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


@triton.jit
def _int4_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, k_tiles, tiles_per_split,
                 stride_xm, stride_qn, stride_sn, stride_ok, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    half = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        packed = tl.load(q_ptr + cols[:, None] * stride_qn + tile * (BLOCK_K // 2) + half[None, :],
                         mask=col_ok[:, None], other=0)
        codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)           # [BLOCK_N, BLOCK_K], in K order
        g = tile * (BLOCK_K // GROUP) + groups
        meta = cols[:, None] * stride_sn + g[None, :]
        zero = tl.load(zero_ptr + meta, mask=col_ok[:, None], other=0).to(tl.float32)
        scale = tl.load(scale_ptr + meta, mask=col_ok[:, None], other=0.0).to(tl.float32)
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:    # sum_k (q - z) s x = s (sum_k q x - z sum_k x): the zero and scale once per group
            x = tl.load(x_ptr + tl.program_id(2) * stride_xm + ks).to(tl.float32)
            dots = tl.sum(tl.reshape(codes * x[None, :], (BLOCK_N, BLOCK_K // GROUP, GROUP)), axis=2)
            x_sums = tl.sum(tl.reshape(x, (BLOCK_K // GROUP, GROUP)), axis=1)
            acc += tl.sum(scale * (dots - zero * x_sums[None, :]), axis=1)[None, :]
        else:
            w = tl.reshape(codes, (BLOCK_N, BLOCK_K // GROUP, GROUP))
            w = tl.reshape((w - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, BLOCK_K))
            acc = _accumulate(acc, x_ptr, rows, ks, M, K, stride_xm, w, BLOCK_M)
    _store(acc, out_ptr, bias_ptr, rows, cols, M, N, split, stride_ok, stride_om, HAS_BIAS, SPLIT)


def _launch(kernel, fmt: str, x: torch.Tensor, n: int, weight_args: tuple, weight_strides: tuple,
            bias: torch.Tensor | None, config: MatmulConfig | None, **constants) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    config = config or config_for(fmt, m)
    block_k = config.block_k
    if fmt == "int4":   # whole groups per tile, and whole tiles per row
        block_k = max(GROUP, block_k)
        while k % block_k:    # tile sizes are powers of two (tl.arange); GROUP always divides K
            block_k //= 2
    k_tiles = triton.cdiv(k, block_k)
    split_k = split_k_for(config, m, n, k_tiles, x.device.index or 0)
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    if split_k > 1:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)   # every element is written
        strides = (out.stride(0), out.stride(1))
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        strides = (0, out.stride(0))
    grid = (triton.cdiv(n, config.block_n), split_k, triton.cdiv(m, config.block_m))
    kernel[grid](x2, *weight_args, bias if bias is not None else x2, out, m, n, k, k_tiles, tiles_per_split,
                 x2.stride(0), *weight_strides, *strides, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                 BLOCK_K=block_k, HAS_BIAS=bias is not None, SPLIT=split_k > 1, num_warps=config.num_warps,
                 num_stages=config.num_stages, **constants)
    if split_k > 1:
        out = out.sum(0)
        out = (out if bias is None else out + bias).to(x.dtype)
    return out.reshape(*lead, n)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` @ dequant(q)^T + bias."""
    return _launch(_int8_kernel, "int8", x, q.shape[0], (q, scale), (q.stride(0),), bias, config)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 config: MatmulConfig) -> torch.Tensor:
    """``x [..., K] @ weight^T + bias`` for a float ``weight [N, K]`` (the int8 kernel without scales)."""
    return _launch(_int8_kernel, "int8", x, weight.shape[0], (weight, weight), (weight.stride(0),), bias, config,
                   HAS_SCALE=False)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bias: torch.Tensor | None, config: MatmulConfig | None = None) -> torch.Tensor:
    """``x [..., K]`` @ dequant(packed)^T + bias; groups of GROUP along K."""
    group = x.shape[-1] // scale.shape[1]
    assert group == GROUP, f"the int4 kernel takes groups of {GROUP}, got {group}"
    return _launch(_int4_kernel, "int4", x, packed.shape[0], (packed, scale, zero),
                   (packed.stride(0), scale.stride(0)), bias, config, GROUP=GROUP)
