"""Matmuls with quantized weights: one entry per format, picking the fastest
kernel for the device and shape, with the torch reference
(``kernels.torch_quant``) wherever no fused kernel fits.

* int8/int4 on CUDA, up to ``FUSED_MAX_ROWS`` rows (decode batches; ``kernels.triton_quant``):
  Triton dequant-GEMV (split K) or dequant-GEMM, reading each weight byte once.
  Decode batches of up to a few hundred sequences are still bound by the
  weight reads, and a dequantized copy would triple them.
* int8/int4 on CUDA, more rows (long prefill chunks): dequantize to the activation dtype,
  then cuBLAS; the matmul is compute-bound there, so the one extra pass over
  the weights costs little, and cuBLAS beats the Triton GEMM
  (``benchmarks/quant_gpu.py`` measures both). A slice of output rows
  (``DEQUANT_ELEMENTS`` values) at a time, as everywhere a matrix is
  dequantized per call: the reference dequantization of a whole int4 matrix
  holds ~12 bytes a value of temporaries (1.4 GB for Llama-3-8B's gate_up),
  which every CUDA graph of more than ``FUSED_MAX_ROWS`` tokens would keep in
  the graphs' pool beside the planned activations.
* CPU with bf16 activations: torch's packed int8 matmul for int8.
* W8A8 on CUDA, any number of rows (``triton_quant.w8a8_matmul``): one
  launch quantizes the activations (SmoothQuant's input scale folded in) to
  int8 codes and a scale per row, bit for bit the torch twin's; one int8 x
  int8 -> int32 GEMM on tensor cores (twice bf16's peak; measured 1.11x bf16
  cuBLAS over Llama-3-8B's projections at 256 rows on an H200) applies both
  scales and the bias in its epilogue. Rows are masked, not padded; launch shapes
  depend on (M, N, K) only, so decode steps capture as CUDA graphs. Before:
  ~8 torch kernels to quantize, ``torch._int_mm`` (16 rows padded to 32) and
  ~4 more to rescale, each a pass over [M, K] or [M, N].
* W8A8 on the CPU: the same quantization in torch, then ``torch._int_mm``.
* GGUF blocks on CUDA: dequantized a slice of output rows at a time
  (``ROWS_ELEMENTS`` values), so no layer is ever held whole in float.
* GGUF blocks on the CPU: repacked at load (``pack_gguf_for_cpu``) for torch's
  packed CPU matmuls, which read each weight byte once for any number of rows
  (dequantizing per call cost ~10x a decode step's weight reads). Those kernels
  are fast with bf16 activations only (with fp32 ones they fall back to a
  scalar loop, ~10x slower; avx512_bf16 does the bf16 products), so
  ``gguf_cpu_linear`` rounds the activations to bf16 and returns bf16.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagellm.kernels import cpu_linear, torch_quant

CPU_MATMUL_DTYPE = torch.bfloat16   # activations, scales and outputs of the packed CPU matmuls
INT4PACK_GROUP = 32                 # Q4_K's groups; the int4pack kernel takes 32, 64, 128 or 256
INT4PACK_ROWS = 64                  # the int4pack layout interleaves blocks of 64 rows: pack whole blocks
INT4PACK_MIN_ROWS = 16              # ... and takes a multiple of 16 rows

FUSED_MAX_ROWS = 256        # up to this many rows go to the fused Triton kernels
ROWS_ELEMENTS = 1 << 22     # weight values dequantized at once by the GGUF path
DEQUANT_ELEMENTS = 1 << 24  # ... by the int8/int4 paths (their temporaries: ~200 MB; fewer launches a prefill step)


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS


def _add(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


def dequantized_linear(x: torch.Tensor, num_rows: int, dequantize_rows: Callable[[int, int], torch.Tensor],
                       elements: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a stored ``W`` of ``num_rows`` output rows, ``dequantize_rows(start, end)``
    giving its float rows ``[start, end)``: about ``elements`` values at a time, so the float copy and its
    temporaries never cover the whole matrix (one slice: exactly the whole-matrix product)."""
    rows = max(1, elements // x.shape[-1])
    if rows >= num_rows:
        return cpu_linear.linear(x, dequantize_rows(0, num_rows), bias)
    parts = [cpu_linear.linear(x, dequantize_rows(start, min(start + rows, num_rows)), None)
             for start in range(0, num_rows, rows)]
    return _add(torch.cat(parts, dim=-1), bias)


TRITON_DEQUANT = True       # off: the benchmarks' "before" on CUDA (the torch twins' float passes)


def _dequantizer(x: torch.Tensor, reference: Callable) -> Callable:
    """``(codes, scale, zero, dtype) -> floats``: the Triton kernel on CUDA (each code read once, each value
    written once), the torch twin ``reference`` elsewhere; both give the same values, bit for bit."""
    if x.is_cuda and TRITON_DEQUANT:
        from pagellm.kernels import triton_quant
        return triton_quant.dequantize
    return reference


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    if _fused(x):
        from pagellm.kernels import triton_quant
        return triton_quant.int8_matmul(x, qweight, scales, bias)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qweight, scales.to(x.dtype))
        return _add(out.reshape(*x.shape[:-1], -1), bias)
    dequantize = _dequantizer(x, lambda q, s, _zero, dtype: torch_quant.dequantize_int8(q, s, dtype))
    return dequantized_linear(x, qweight.shape[0], lambda start, end: dequantize(
        qweight[start:end], scales[start:end], None, x.dtype), DEQUANT_ELEMENTS, bias)


W8A8_FUSED = True           # off: the benchmarks' "before" on CUDA (quantize in torch, then torch._int_mm)
INT_MM_MIN_ROWS = 17        # torch._int_mm on CUDA needs more than 16 rows


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x * input_scale`` (SmoothQuant's smoothing, in x's dtype; None: none) quantized per token, times the
    int8 ``qweight`` exactly, rescaled (+ bias)."""
    if x.is_cuda and W8A8_FUSED:
        from pagellm.kernels import triton_quant
        return triton_quant.w8a8_matmul(x, qweight, scales, bias, input_scale)
    return int_mm_w8a8_linear(x if input_scale is None else x * input_scale.to(x.dtype), qweight, scales, bias)


def int_mm_w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                       ) -> torch.Tensor:
    """W8A8 through torch: ``torch_quant.quantize_per_token``, ``torch._int_mm`` (on CUDA a batch of 16 rows
    or fewer is padded to 32), then the rescale."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    qx, xscale = torch_quant.quantize_per_token(x2)
    if x.is_cuda and m < INT_MM_MIN_ROWS:
        qx = F.pad(qx, (0, 0, 0, 32 - m))
    acc = torch._int_mm(qx, qweight.t())[:m]
    out = (acc.float() * xscale[:, None] * scales[None, :]).to(x.dtype).reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def int_mm_supported(device: torch.device) -> bool:
    """Whether torch's int8 matmul runs on ``device`` (probed with the smallest shape it takes)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        torch._int_mm(a, a)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    if _fused(x):
        from pagellm.kernels import triton_quant
        return triton_quant.int4_matmul(x, qweight, scales, zeros, bias)
    dequantize = _dequantizer(x, torch_quant.dequantize_int4)
    return dequantized_linear(x, qweight.shape[0], lambda start, end: dequantize(
        qweight[start:end], scales[start:end], zeros[start:end], x.dtype), DEQUANT_ELEMENTS, bias)


def gguf_linear(x: torch.Tensor, data: torch.Tensor, qtype: GGMLQuantizationType | None) -> torch.Tensor:
    """``x @ W^T`` for a GGUF tensor's blocks (``qtype`` None: ``data`` is a float matrix)."""
    if qtype is None:
        return cpu_linear.linear(x, data, None)
    return dequantized_linear(x, data.shape[0], lambda start, end: torch_quant.dequantize_gguf(
        data[start:end], qtype, x.dtype), ROWS_ELEMENTS)


def packs_as_int4(qtype: GGMLQuantizationType, rows: int) -> bool:
    """Whether a tensor of ``rows`` rows of ``qtype`` can take the int4 layout of ``pack_gguf_for_cpu``."""
    return qtype == GGMLQuantizationType.Q4_K and rows % INT4PACK_MIN_ROWS == 0


def pack_gguf_for_cpu(data: torch.Tensor, qtype: GGMLQuantizationType, int4: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF tensor's rows as (``qweight``, ``scales``) of ``gguf_cpu_linear``:
    ``int4`` (Q4_K with rows the kernel tiles: ``packs_as_int4``) ->
    ``torch._weight_int4pack_mm_for_cpu``'s layout (``uint8 [N, K/2]``, scale
    and zero ``[K/32, N, 2]``; the file's codes, exact but for the bf16 scale
    and zero); else ``int8 [N, K]`` and a scale per row for ``torch._weight_int8pack_mm``
    (requantized: torch has no CPU kernel for 5-, 6- or 8-bit codes with
    group scales). A slice of rows at a time (about ``ROWS_ELEMENTS`` values),
    so the tensor is never held whole in float."""
    rows = max(1, ROWS_ELEMENTS // (2 * data.shape[1]) // INT4PACK_ROWS) * INT4PACK_ROWS
    parts = [_pack_rows(data[start:start + rows], qtype, int4) for start in range(0, data.shape[0], rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts], dim=1 if int4 else 0).contiguous()


def _pack_rows(data: torch.Tensor, qtype: GGMLQuantizationType, int4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not int4:
        return torch_quant.requantize_int8(data, qtype, CPU_MATMUL_DTYPE)
    codes, scale, zero = torch_quant.gguf_int4_groups(data)
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(CPU_MATMUL_DTYPE)
    return torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1), scale_zero


def gguf_cpu_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` (bf16 ``x [M, K]``, bf16 out) for ``pack_gguf_for_cpu``'s layouts."""
    if qweight.dtype == torch.uint8:
        return torch._weight_int4pack_mm_for_cpu(x, qweight, INT4PACK_GROUP, scales)
    return torch._weight_int8pack_mm(x, qweight, scales)
