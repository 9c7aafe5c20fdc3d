"""Building blocks of a Llama-family transformer; the elementwise math runs
through ``ops`` (the torch reference or its Triton twins, kernels/).

The linear-method seam. Every weight matrix of the model (the merged q|k|v
and gate|up projections, o and down, the token embedding, the LM head) is a
``Linear`` made by one ``LayerFactory``. Projections that read the same input
are merged so each is one matmul; the checkpoint's separate tensors are
loaded into their row ranges ("shards"). *How* a matrix is stored and
multiplied is its ``LinearMethod``: ``DenseLinearMethod`` keeps it as is; a
quantized method keeps codes and scales, a tensor-parallel one its rank's
slice. The method registers the layer's parameters and, in
``layer.weight_loaders``, a loader for each tensor a checkpoint may hold for
the layer (``weight``, ``bias``; a quantized checkpoint's ``qweight``,
``scales``, ...): ``loader(tensor, shard_id)`` puts one checkpoint tensor (or
shard ``shard_id`` of a merged layer) where it belongs, quantizing a float
weight on the way if the method stores codes. The model loader only maps
checkpoint names to layers and never knows how a weight is stored.

After loading, ``Linear.scale_outputs`` can multiply output channels by
constants (key smoothing for a quantized KV cache, ``model.key_smoothing``):
folded into the stored rows by a method that has ``scale_rows`` (dense,
int8, int4: exact), else applied to the layer's output (GGUF blocks).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops: ModuleType
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new residual stream); ``ops`` is torch_ops or triton_ops."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class LinearMethod(Protocol):
    """How a ``Linear`` stores its matrix and computes with it."""

    def create_weights(self, layer: Linear) -> None:
        """Register the layer's parameters (sizes and dtype from ``layer``) and
        their loaders in ``layer.weight_loaders``."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + layer.bias``."""

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``W``, in the layer's dtype."""

    # Optional: ``scale_rows(layer, factors [output_size])`` multiplies row i of W by factors[i] in storage.


class DenseLinearMethod:
    """The matrix as it is, ``[output_size, input_size]`` in the model dtype."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size, dtype=layer.params_dtype),
                                    requires_grad=False)
        layer.weight_loaders["weight"] = functools.partial(layer.load_rows, layer.weight)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def scale_rows(self, layer: Linear, factors: torch.Tensor) -> None:
        layer.weight.data.copy_(layer.weight.float() * factors[:, None])


DENSE = DenseLinearMethod()


# loader(checkpoint tensor, shard id or None for the whole layer)
WeightLoader = Callable[[torch.Tensor, "int | None"], None]


def dense_everywhere(prefix: str) -> LinearMethod:
    return DENSE


class Linear(nn.Module):
    """A weight matrix ``[sum(output_sizes), input_size]`` whose output rows
    concatenate the checkpoint tensors it merges (``output_sizes`` rows each:
    q|k|v, gate|up; a single size for the others)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, method: LinearMethod,
                 params_dtype: torch.dtype) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_offsets = [0, *itertools.accumulate(self.output_sizes)]
        self.params_dtype = params_dtype
        self.method = method
        self.weight_loaders: dict[str, WeightLoader] = {}
        method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size, dtype=params_dtype), requires_grad=False)
            self.weight_loaders["bias"] = functools.partial(self.load_rows, self.bias)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("output_scale", None)   # set by scale_outputs when the method can't fold it

    @property
    def output_size(self) -> int:
        return self.output_offsets[-1]

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None,
                  output_dim: int = 0) -> None:
        """Copy ``loaded`` into the rows of output shard ``shard_id`` (all rows
        when None) of ``param``, whose output dimension is ``output_dim``."""
        target = param.data
        if shard_id is not None:
            target = target.narrow(output_dim, self.output_offsets[shard_id], self.output_sizes[shard_id])
        if target.shape != loaded.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                             f"{tuple(target.shape)}")
        target.copy_(loaded)

    def scale_outputs(self, factors: torch.Tensor) -> None:
        """Multiply output channel i (row i of W and the bias) by ``factors[i]``;
        folded into storage by the method's ``scale_rows`` if it has one, else
        applied to every output (the bias is inside it)."""
        factors = factors.float()
        fold = getattr(self.method, "scale_rows", None)
        if fold is None:
            self.output_scale = factors.to(self.params_dtype)
            return
        fold(self, factors)
        if self.bias is not None:
            self.bias.data.copy_(self.bias.float() * factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, x)
        return out if self.output_scale is None else out * self.output_scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The matrix read by rows: a token embedding (tied embeddings share this module with the LM head)."""
        return self.method.embed(self, ids)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, output_sizes={self.output_sizes}, method={type(self.method).__name__}"


@dataclass(frozen=True)
class LayerFactory:
    """Makes every weight matrix of a model, so how weights are stored (dense,
    quantized, sharded) is decided in one place: ``linear_method`` picks the
    method for each layer by its name in the model (``layers.0.mlp.down_proj``,
    ``embed_tokens``, ``lm_head``)."""

    params_dtype: torch.dtype
    linear_method: Callable[[str], LinearMethod] = dense_everywhere

    def linear(self, prefix: str, input_size: int, output_sizes: list[int], bias: bool = False) -> Linear:
        return Linear(input_size, output_sizes, bias, self.linear_method(prefix), self.params_dtype)

    def norm(self, hidden_size: int, eps: float) -> RMSNorm:
        return RMSNorm(hidden_size, eps, self.params_dtype)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Parameters that are neither merged nor stored specially (norm weights)."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, ops: ModuleType) -> None:
        """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` in place."""
        ops.rotary(q, k, positions, self.cos_sin_cache)
