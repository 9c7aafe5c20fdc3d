"""Matmuls with quantized weights: one entry per format, picking the fastest
kernel for the device and shape, with the torch reference
(``kernels.torch_quant``) wherever no fused kernel fits.

* CUDA, a few rows (decode): Triton dequant-GEMV (``kernels.triton_quant``),
  reading each weight byte once.
* CUDA, many rows (prefill): dequantize to the activation dtype, then cuBLAS;
  the matmul is compute-bound there, so the one extra pass over the weights
  costs little.
* CPU with bf16 activations: torch's packed int8 matmul for int8.
* GGUF blocks: dequantized a slice of output rows at a time (``ROWS_ELEMENTS``
  values), so no layer is ever held whole in float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagellm.kernels import torch_quant

GEMV_MAX_ROWS = 16          # up to this many rows go to the fused GEMV kernels
ROWS_ELEMENTS = 1 << 22     # weight values dequantized at once by the GGUF path


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() // x.shape[-1] <= GEMV_MAX_ROWS


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    if _fused(x):
        from pagellm.kernels import triton_quant
        return triton_quant.int8_gemv(x, qweight, scales, bias)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qweight, scales.to(x.dtype))
        out = out.reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias
    return torch_quant.int8_linear(x, qweight, scales, bias)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    if _fused(x):
        from pagellm.kernels import triton_quant
        return triton_quant.int4_gemv(x, qweight, scales, zeros, bias)
    return torch_quant.int4_linear(x, qweight, scales, zeros, bias)


def gguf_linear(x: torch.Tensor, data: torch.Tensor, qtype: GGMLQuantizationType | None) -> torch.Tensor:
    """``x @ W^T`` for a GGUF tensor's blocks (``qtype`` None: ``data`` is a float matrix)."""
    if qtype is None:
        return F.linear(x, data)
    rows = max(1, ROWS_ELEMENTS // x.shape[-1])
    return torch.cat([F.linear(x, torch_quant.dequantize_gguf(data[start:start + rows], qtype, x.dtype))
                      for start in range(0, data.shape[0], rows)], dim=-1)
