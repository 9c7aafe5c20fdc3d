"""Fused dequant-GEMV in Triton for a few rows of activations (decode): each
weight byte is read once and dequantized in registers, never written back.

Layouts are those of :mod:`pagellm.kernels.torch_quant` (the reference twins):
int8 ``q [N, K]`` with a scale per row; int4 two codes a byte along K
(``packed [N, K/2]``, even element in the low nibble) with a scale and a zero
point per group of ``G`` (a K tile is exactly one group).

Grid ``(cdiv(N, BLOCK_N), split_k)``: a program owns ``BLOCK_N`` output
channels and a run of K tiles; ``split_k`` is chosen so the GPU has a few
programs per SM even when N is small (bs1 decode is bound by memory bandwidth,
which needs many loads in flight). Each program writes its partial sums to a
``[split_k, M, N]`` fp32 buffer that one ``sum`` reduces, so results do not
depend on the order programs finish in. The activations (at most 16 rows,
padded) go through ``tl.dot`` as bf16/fp16 against the dequantized tile, with
fp32 accumulation. Launch shapes depend only on (M, N, K), so the kernels are
safe inside CUDA graphs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 128           # int4: equals the group size
PROGRAMS_PER_SM = 4
NUM_WARPS = 4
ROWS_PAD = 16           # tl.dot needs at least 16 rows


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_for(n: int, k_tiles: int, device_index: int) -> int:
    """Largest power of two <= the K tiles that brings the grid to ~PROGRAMS_PER_SM programs per SM."""
    wanted = max(1, PROGRAMS_PER_SM * _num_sms(device_index) // triton.cdiv(n, BLOCK_N))
    limit = min(wanted, k_tiles)
    return 1 << (limit.bit_length() - 1)


@triton.jit
def _int8_gemv_kernel(x_ptr, q_ptr, scale_ptr, partial_ptr, M, N, K, k_tiles, tiles_per_split,
                      stride_xm, stride_qn, stride_pk, stride_pm,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & k_ok[None, :],
                    other=0.0)
        q = tl.load(q_ptr + cols[:, None] * stride_qn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        acc += tl.dot(x, tl.trans(q.to(x.dtype)))
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    tl.store(partial_ptr + split * stride_pk + rows[:, None] * stride_pm + cols[None, :], acc * scale[None, :],
             mask=(rows[:, None] < M) & col_ok[None, :])


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, partial_ptr, M, N, K, k_tiles, tiles_per_split,
                      stride_xm, stride_qn, stride_sn, stride_pk, stride_pm,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    half = tl.arange(0, BLOCK_K // 2)
    row_ok = rows[:, None] < M
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, k_tiles)):
        k0 = tile * BLOCK_K
        x_even = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + 2 * half[None, :], mask=row_ok, other=0.0)
        x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + 2 * half[None, :] + 1, mask=row_ok, other=0.0)
        packed = tl.load(q_ptr + cols[:, None] * stride_qn + k0 // 2 + half[None, :], mask=col_ok[:, None], other=0)
        zero = tl.load(zero_ptr + cols * stride_sn + tile, mask=col_ok, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + cols * stride_sn + tile, mask=col_ok, other=0.0)
        low = ((packed & 0xF).to(tl.float32) - zero[:, None]).to(x_even.dtype)
        high = ((packed >> 4).to(tl.float32) - zero[:, None]).to(x_even.dtype)
        acc += (tl.dot(x_even, tl.trans(low)) + tl.dot(x_odd, tl.trans(high))) * scale[None, :]
    tl.store(partial_ptr + split * stride_pk + rows[:, None] * stride_pm + cols[None, :], acc,
             mask=row_ok & col_ok[None, :])


def _launch(kernel, x: torch.Tensor, n: int, extra_args: tuple, extra_strides: tuple, bias: torch.Tensor | None
            ) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    assert m <= ROWS_PAD, f"the GEMV kernels take at most {ROWS_PAD} rows, got {m}"
    k_tiles = triton.cdiv(k, BLOCK_K)
    split_k = split_k_for(n, k_tiles, x.device.index or 0)
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)   # every element is written
    kernel[(triton.cdiv(n, BLOCK_N), split_k)](
        x2, *extra_args, partial, m, n, k, k_tiles, tiles_per_split, x2.stride(0), *extra_strides,
        partial.stride(0), partial.stride(1), ROWS=ROWS_PAD, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS)
    out = partial.sum(0) if split_k > 1 else partial[0]
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*lead, n)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K]`` (at most 16 rows) @ dequant(q)^T + bias."""
    return _launch(_int8_gemv_kernel, x, q.shape[0], (q, scale), (q.stride(0),), bias)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K]`` (at most 16 rows) @ dequant(packed)^T + bias; groups of BLOCK_K along K."""
    group = x.shape[-1] // scale.shape[1]
    assert group == BLOCK_K, f"the int4 kernel takes groups of {BLOCK_K}, got {group}"
    return _launch(_int4_gemv_kernel, x, packed.shape[0], (packed, scale, zero), (packed.stride(0), scale.stride(0)),
                   bias)
