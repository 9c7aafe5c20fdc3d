"""Fused elementwise Triton kernels for the model's hot path.

* ``rms_norm(x, weight, eps, residual=None) -> (out, new_residual)``: with a
  residual, ``new_residual = x + residual`` rounded to x's dtype, and the norm is
  taken of that; without, ``new_residual`` is ``x`` itself. The norm follows HF
  Llama: fp32 ``r * rsqrt(mean(r^2) + eps)``, cast to x's dtype, then times the
  weight (the product rounded to x's dtype). One program per row.
* ``rotary(q, k, positions, cos_sin_cache)``: NeoX (rotate-half) rotary
  embedding applied in place to ``q [T, H, D]`` and ``k [T, Hkv, D]``.
  ``cos_sin_cache [max_position, rotary_dim]`` (fp32) holds
  ``cat(cos(pos * inv_freq), sin(pos * inv_freq))``; the first ``rotary_dim``
  features of every head rotate, in fp32. One program per token, all heads.
* ``silu_and_mul(x [T, 2I]) -> [T, I]``: ``silu(x[:, :I]) * x[:, I:]`` in fp32,
  rounded once. Grid ``(T, I / BLOCK)``.

Programmatic dependent launch (PDL, Hopper and later; ``PDL``): the kernels of
a decode step (these, the KV write, decode attention and the dense GEMV) are
launched with ``launch_pdl``, so the hardware may start one while its
predecessor in the stream still runs: its launch, and in the GEMV the first
weight tile's loads, overlap the predecessor's tail instead of following it
(also inside CUDA graphs, whose capture keeps the programmatic edges). The
invariant every such kernel keeps: before touching any buffer another kernel
writes or reads it calls ``wait_for_producer`` (``griddepcontrol.wait``: the
predecessor has completed and its writes are visible), and only after that
wait lets its own successor launch. So a kernel never starts before the one
two back has completed, and only constants (weights) are read before the wait.
Measured (H200, Llama-3-8B bs1 decode graph): 15-20 us of a 4.5 ms replay. The
~1 us between dependent kernels is mostly the predecessor's completion and
memory flush and the first dependent loads, which PDL cannot overlap; the
graph already hid the launches.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

RMS_NORM_MAX_WARPS = 16
RMS_NORM_ELEMENTS_PER_WARP = 512     # 8 warps for a 4,096 row: 1.61 us on an H200, 16 warps the same, 2 warps 2.0
SILU_BLOCK = 1024
SILU_NUM_WARPS = 4
ROTARY_NUM_WARPS = 4
PDL = True          # off: the benchmarks' "before"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def pdl_args(t: torch.Tensor) -> dict:
    """Launch arguments of a PDL-aware kernel for tensors on ``t``'s device: its ``PDL``
    constexpr and Triton's ``launch_pdl``, both on where the device has PDL."""
    on = PDL and t.is_cuda and not INTERPRETED and _capability(t.device.index or 0) >= (9, 0)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Wait until the previous kernel has completed (its writes visible), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_residual, stride_out, stride_residual_out, hidden, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)     # a constant: read before the wait
    wait_for_producer(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x [..., hidden]``, optionally after adding ``residual``."""
    shape = x.shape
    hidden = shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        residual2 = residual.reshape(-1, hidden)
        assert residual2.stride(-1) == 1
        new_residual = torch.empty_like(out)
    else:
        residual2 = new_residual = x2          # placeholders, unused
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // RMS_NORM_ELEMENTS_PER_WARP, 1), RMS_NORM_MAX_WARPS)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, residual2, weight, out, new_residual,
            x2.stride(0), residual2.stride(0), out.stride(0), new_residual.stride(0), hidden, eps,
            BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps, **pdl_args(x))
    if residual is None:
        return out.view(shape), x
    return out.view(shape), new_residual.view(shape)


@triton.jit
def rotate_heads(ptr, token, cos, sin, stride_t, stride_h, num_heads, half,
                 HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < half)[None, :]
    first = ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   num_q_heads, num_kv_heads, half,
                   Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cache = cos_sin_ptr + pos * stride_cache + dims
    cos = tl.load(cache, mask=dims < half, other=0.0).to(tl.float32)
    sin = tl.load(cache + half, mask=dims < half, other=0.0).to(tl.float32)
    rotate_heads(q_ptr, token, cos, sin, stride_qt, stride_qh, num_q_heads, half, Q_HEADS_PAD, HALF_PAD)
    rotate_heads(k_ptr, token, cos, sin, stride_kt, stride_kh, num_kv_heads, half, KV_HEADS_PAD, HALF_PAD)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In-place NeoX rotary on ``q [T, H, D]``, ``k [T, Hkv, D]`` at ``positions [T]``."""
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    half = cos_sin_cache.shape[1] // 2
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_kv_heads, half,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF_PAD=triton.next_power_of_2(half), num_warps=ROTARY_NUM_WARPS)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = cat(gate, up)`` along the last dim."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, SILU_BLOCK))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=SILU_BLOCK, num_warps=SILU_NUM_WARPS,
            **pdl_args(x))
    return out.view(*x.shape[:-1], inter)


__all__ = ["rms_norm", "rotary", "silu_and_mul", "pdl_args", "wait_for_producer"]
