"""The dense matmul ``x @ W^T + b`` every linear of the model takes outside the
fused kernels (dense layers, GGUF float tensors, the dequantize-then-multiply
references of the quantized formats), so one fp32 CPU formulation serves them
all and a quantized layer and its dequantized dense twin add in the same order.

fp32 on the CPU goes to oneDNN's inner product on the weight as stored (no
packed copy). torch's ``F.linear`` takes MKL's sgemm there, which on this AMD
host costs 2-4x one row's time for 2-9 rows (one row takes a GEMV path), so
every multi-row decode step (a speculative verification of k+1 rows, a draft's
catch-up) cost several steps; oneDNN's costs 1.2-1.9x one row for 2-9 rows,
about what ``F.linear`` costs for one row summed over a model's layers, and less
for prefill (``benchmarks/cpu_packed_rows.py --kernels fp32-F.linear,fp32-oneDNN``).
Other dtypes and devices, and autograd (the oneDNN op has no backward), keep
``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ONEDNN = torch.backends.mkldnn.is_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
