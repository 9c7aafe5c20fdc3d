"""Matmuls with quantized weights: one entry per format, picking the fastest
kernel for the device and shape, with the torch reference
(``kernels.torch_quant``) wherever no fused kernel fits.

* CUDA, up to ``FUSED_MAX_ROWS`` rows (decode batches; ``kernels.triton_quant``):
  Triton dequant-GEMV (split K) or dequant-GEMM, reading each weight byte once.
  Decode batches of up to a few hundred sequences are still bound by the
  weight reads, and a dequantized copy would triple them.
* CUDA, more rows (long prefill chunks): dequantize to the activation dtype,
  then cuBLAS; the matmul is compute-bound there, so the one extra pass over
  the weights costs little, and cuBLAS beats the Triton GEMM
  (``benchmarks/quant_gpu.py`` measures both).
* CPU with bf16 activations: torch's packed int8 matmul for int8.
* W8A8, any device: activations quantized per token, then torch's int8
  matmul (``torch._int_mm``: cuBLAS on CUDA, which wants more than 16 rows,
  so decode batches are padded to 32).
* GGUF blocks: dequantized a slice of output rows at a time (``ROWS_ELEMENTS``
  values), so no layer is ever held whole in float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pagellm.kernels import torch_quant

FUSED_MAX_ROWS = 256        # up to this many rows go to the fused Triton kernels
ROWS_ELEMENTS = 1 << 22     # weight values dequantized at once by the GGUF path


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    if _fused(x):
        from pagellm.kernels import triton_quant
        return triton_quant.int8_matmul(x, qweight, scales, bias)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qweight, scales.to(x.dtype))
        out = out.reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias
    return torch_quant.int8_linear(x, qweight, scales, bias)


INT_MM_MIN_ROWS = 17        # torch._int_mm on CUDA needs more than 16 rows


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
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
    return torch_quant.int4_linear(x, qweight, scales, zeros, bias)


def gguf_linear(x: torch.Tensor, data: torch.Tensor, qtype: GGMLQuantizationType | None) -> torch.Tensor:
    """``x @ W^T`` for a GGUF tensor's blocks (``qtype`` None: ``data`` is a float matrix)."""
    if qtype is None:
        return F.linear(x, data)
    rows = max(1, ROWS_ELEMENTS // x.shape[-1])
    return torch.cat([F.linear(x, torch_quant.dequantize_gguf(data[start:start + rows], qtype, x.dtype))
                      for start in range(0, data.shape[0], rows)], dim=-1)
