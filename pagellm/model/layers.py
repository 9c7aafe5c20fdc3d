"""Building blocks of a Llama-family transformer; the elementwise math runs
through ``ops`` (the torch reference or its Triton twins, kernels/).

Projections that read the same input are fused (q|k|v, gate|up) so each is one
matmul; the checkpoint's separate tensors are loaded into slices of them.
"""
from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops: ModuleType
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new residual stream); ``ops`` is torch_ops or triton_ops."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class MergedLinear(nn.Linear):
    """One Linear whose output rows are the concatenation of several
    checkpoint projections (``shard_sizes`` rows each)."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_offsets = [0]
        for size in shard_sizes:
            self.shard_offsets.append(self.shard_offsets[-1] + size)

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        start, end = self.shard_offsets[shard], self.shard_offsets[shard + 1]
        getattr(self, param_name).data[start:end].copy_(tensor)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's frequency-dependent scaling or linear scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(medium, blended, scaled).float()


class RotaryEmbedding(nn.Module):
    """NeoX-style (rotate-half) rotary embedding from a cos|sin cache per position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_sin_cache", self._build_cache(), persistent=False)

    def _build_cache(self) -> torch.Tensor:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def reset_cache(self) -> None:
        """Rebuild after the module was materialised from the meta device."""
        self.cos_sin_cache = self._build_cache().to(self.cos_sin_cache.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ops: ModuleType) -> None:
        """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` in place."""
        ops.rotary(q, k, positions, self.cos_sin_cache)
