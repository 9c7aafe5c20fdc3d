"""Reference elementwise ops of the model in plain torch; ``triton_ops`` holds
their fused twins with the same signatures (an attention backend exposes the
matching module as ``backend.ops``)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32 as HF Llama does it, after adding ``residual`` if given.
    Returns (normed, new residual stream)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """NeoX-style (rotate-half) rotary embedding, in place, on ``q [T, H, D]``
    and ``k [T, Hkv, D]``; ``cos_sin_cache [max_pos, D]`` = cat(cos, sin) in fp32."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    for x in (q, k):
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
