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

Tensor parallelism (Megatron-style) is the layer's part of the seam, not the
method's: every matrix is a ``ColumnParallelLinear`` (q|k|v, gate|up: each
rank holds a slice of every shard's output rows, no communication),
a ``RowParallelLinear`` (o, down: a slice of the input columns, one
all-reduce of the partial sums) or a ``VocabParallelEmbedding`` (the token
embedding and LM head: a slice of the vocabulary rows). Each checkpoint
tensor reaches ``load_rows`` whole and ``shard_of`` cuts the rank's part, so
any method (dense, int8 codes and per-row scales, int4 groups, GGUF blocks)
shards the same way: output rows for column-parallel layers, input columns
(proportionally: int4 codes and group scales, GGUF block bytes) for
row-parallel ones, whose 1-D tensors (per-row scales, bias) stay whole. A
method quantizes the whole tensor before it is cut, so every rank holds
exactly the codes and scales of one process. A checkpoint tensor may arrive
unread (``hf_loader.LazySlice``): cutting it reads nothing, and ``read``
reads only the part kept (the whole, where a method quantizes). With one
rank these layers are plain linears.

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

from pagellm.distributed.groups import SINGLE, TensorGroup
from pagellm.kernels import cpu_linear


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

    # Optional: ``scale_rows(layer, factors [output_size])`` multiplies row i of W by factors[i] in storage;
    # ``apply_silu_and_mul(layer, x)``: ``silu(gate) * up`` of a merged gate|up output in one step, or None.


class DenseLinearMethod:
    """The matrix as it is, ``[output_size, input_size]`` in the model dtype."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size, dtype=layer.params_dtype),
                                    requires_grad=False)
        layer.weight_loaders["weight"] = functools.partial(layer.load_rows, layer.weight)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        config = _gemv_config(layer, x)
        if config is not None:
            from pagellm.kernels import triton_quant
            return triton_quant.dense_matmul(x, layer.weight, layer.bias, config)
        return cpu_linear.linear(x, layer.weight, layer.bias)

    def apply_silu_and_mul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of a merged gate|up layer in the GEMV's epilogue, where its one-row GEMV serves
        the layer; None elsewhere."""
        from pagellm.kernels import triton_quant
        config = _gemv_config(layer, x)
        if config is None or layer.bias is not None or not triton_quant.FUSED_SILU:
            return None
        return triton_quant.dense_silu_and_mul(x, layer.weight, config)

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def scale_rows(self, layer: Linear, factors: torch.Tensor) -> None:
        layer.weight.data.copy_(layer.weight.float() * factors[:, None])


def _gemv_config(layer: Linear, x: torch.Tensor):
    """The Triton GEMV's tiles for ``x @ W^T`` when x is one row on CUDA and they beat cuBLAS for W's shape."""
    if x.is_cuda and x.numel() == x.shape[-1]:
        from pagellm.kernels import triton_quant
        return triton_quant.DENSE_GEMV.get(tuple(layer.weight.shape))
    return None


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

    def shard_of(self, loaded: torch.Tensor, shard_id: int | None, output_dim: int = 0) -> torch.Tensor:
        """The part of checkpoint tensor ``loaded`` (of output shard ``shard_id``;
        output rows along ``output_dim``) this rank holds: all of it."""
        return loaded

    def input_part(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's part of a vector over the input columns (a calibrated input smoothing): all of it."""
        return values

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None,
                  output_dim: int = 0) -> None:
        """Copy this rank's part of ``loaded`` into the rows of output shard
        ``shard_id`` (all rows when None) of ``param``, whose output dimension
        is ``output_dim``."""
        loaded = read(self.shard_of(loaded, shard_id, output_dim))
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

    def silu_and_mul(self, x: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        """``silu(gate) * up`` of this merged gate|up layer's output: fused by the method where it can (one
        launch fewer), else the layer, then ``ops.silu_and_mul``."""
        fused = getattr(self.method, "apply_silu_and_mul", None)
        out = fused(self, x) if fused is not None and self.output_scale is None else None
        return ops.silu_and_mul(self(x)) if out is None else out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The matrix read by rows: a token embedding (tied embeddings share this module with the LM head)."""
        return self.method.embed(self, ids)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, output_sizes={self.output_sizes}, method={type(self.method).__name__}"


class ColumnParallelLinear(Linear):
    """Each output shard ``i`` keeps rows ``row_ranges[i] = (start, count)`` of its checkpoint tensor."""

    def __init__(self, input_size: int, row_ranges: list[tuple[int, int]], bias: bool, method: LinearMethod,
                 params_dtype: torch.dtype, tp: TensorGroup) -> None:
        self.row_ranges = row_ranges
        self.tp = tp
        super().__init__(input_size, [count for _, count in row_ranges], bias, method, params_dtype)

    def shard_of(self, loaded: torch.Tensor, shard_id: int | None, output_dim: int = 0) -> torch.Tensor:
        start, count = self.row_ranges[shard_id or 0]
        return loaded.narrow(output_dim, start, count)


class RowParallelLinear(Linear):
    """Keeps 1/tp of the input columns; the ranks' partial products are summed by one all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool, method: LinearMethod,
                 params_dtype: torch.dtype, tp: TensorGroup) -> None:
        self.tp = tp
        local = _split(input_size, tp.size, "input columns")
        try:
            super().__init__(local, [output_size], bias, method, params_dtype)
        except ValueError as exc:
            raise ValueError(f"{exc} (tensor parallelism: each of {tp.size} ranks holds {local} of the "
                             f"{input_size} input columns)") from None

    def shard_of(self, loaded: torch.Tensor, shard_id: int | None, output_dim: int = 0) -> torch.Tensor:
        if loaded.dim() < 2:
            return loaded
        input_dim = 1 - output_dim
        width = _split(loaded.shape[input_dim], self.tp.size, "stored columns")
        return loaded.narrow(input_dim, self.tp.rank * width, width)

    def input_part(self, values: torch.Tensor) -> torch.Tensor:
        return values.narrow(0, self.tp.rank * self.input_size, self.input_size)

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None,
                  output_dim: int = 0) -> None:
        if param is self.bias and self.tp.rank:   # added once, by rank 0, before the sum over ranks
            loaded = torch.zeros(tuple(loaded.shape))
        super().load_rows(param, loaded, shard_id, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.method.apply(self, x))


class VocabParallelEmbedding(ColumnParallelLinear):
    """The token embedding and the LM head (one module when tied): each rank
    keeps ``ceil(vocab / tp)`` of the vocabulary rows, the last rank's padded
    with zero rows when the ranks do not divide the vocabulary. Looking up ids
    other ranks hold gives zeros, so an all-reduce assembles the embedding; the
    LM head's partial logits are gathered side by side and the padding cut off."""

    def __init__(self, hidden_size: int, vocab_size: int, method: LinearMethod, params_dtype: torch.dtype,
                 tp: TensorGroup) -> None:
        self.vocab_size = vocab_size
        count = -(-vocab_size // tp.size)
        super().__init__(hidden_size, [(tp.rank * count, count)], False, method, params_dtype, tp)

    def shard_of(self, loaded: torch.Tensor, shard_id: int | None, output_dim: int = 0) -> torch.Tensor:
        start, count = self.row_ranges[0]
        rows = loaded.shape[output_dim]
        kept = max(0, min(count, rows - start))
        part = loaded.narrow(output_dim, min(start, rows), kept)
        if kept == count:
            return part
        part = read(part)
        padding = list(part.shape)
        padding[output_dim] = count - kept
        return torch.cat([part, part.new_zeros(padding)], dim=output_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().embed(ids)
        start, count = self.row_ranges[0]
        local = ids - start
        outside = (local < 0) | (local >= count)
        rows = super().embed(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        return self.tp.all_reduce(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(super().forward(x))
        return logits if logits.shape[-1] == self.vocab_size else logits[..., :self.vocab_size]


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"tensor parallelism: {size} {what} do not split over {parts} ranks")
    return size // parts


@dataclass(frozen=True)
class LayerFactory:
    """Makes every weight matrix of a model, so how weights are stored (dense,
    quantized, sharded) is decided in one place: ``linear_method`` picks the
    method for each layer by its name in the model (``layers.0.mlp.down_proj``,
    ``embed_tokens``, ``lm_head``), ``tp`` the slice this rank keeps."""

    params_dtype: torch.dtype
    linear_method: Callable[[str], LinearMethod] = dense_everywhere
    tp: TensorGroup = SINGLE

    def column(self, prefix: str, input_size: int, output_sizes: list[int], bias: bool = False
               ) -> ColumnParallelLinear:
        """Merged projections of one input (gate|up): 1/tp of each shard's rows."""
        counts = [_split(size, self.tp.size, "output rows") for size in output_sizes]
        return self._column(prefix, input_size, [(self.tp.rank * c, c) for c in counts], bias)

    def qkv(self, prefix: str, input_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
            bias: bool) -> ColumnParallelLinear:
        """q|k|v by whole heads: 1/tp of the query heads, and of the KV heads,
        or the one KV head this rank's query heads read when tp exceeds them
        (it is then replicated on tp / num_kv_heads ranks)."""
        q_heads = _split(num_heads, self.tp.size, "query heads")
        if num_kv_heads % self.tp.size and self.tp.size % num_kv_heads:
            raise ValueError(f"tensor parallelism: {self.tp.size} ranks neither divide nor are a multiple of "
                             f"the {num_kv_heads} KV heads")
        kv_heads = max(1, num_kv_heads // self.tp.size)
        kv = (self.tp.rank * num_kv_heads // self.tp.size * head_dim, kv_heads * head_dim)
        return self._column(prefix, input_size, [(self.tp.rank * q_heads * head_dim, q_heads * head_dim), kv, kv],
                            bias)

    def _column(self, prefix: str, input_size: int, row_ranges: list[tuple[int, int]], bias: bool
                ) -> ColumnParallelLinear:
        return ColumnParallelLinear(input_size, row_ranges, bias, self.linear_method(prefix), self.params_dtype,
                                    self.tp)

    def row(self, prefix: str, input_size: int, output_size: int, bias: bool = False) -> RowParallelLinear:
        return RowParallelLinear(input_size, output_size, bias, self.linear_method(prefix), self.params_dtype,
                                 self.tp)

    def vocab(self, prefix: str, hidden_size: int, vocab_size: int) -> VocabParallelEmbedding:
        return VocabParallelEmbedding(hidden_size, vocab_size, self.linear_method(prefix), self.params_dtype,
                                      self.tp)

    def norm(self, hidden_size: int, eps: float) -> RMSNorm:
        return RMSNorm(hidden_size, eps, self.params_dtype)


def read(loaded) -> torch.Tensor:
    """A checkpoint tensor's values: the tensor, or the kept part of an unread one, read now."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.read()


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Parameters that are neither merged nor stored specially (norm weights)."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(read(loaded))


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
    """NeoX-style (rotate-half) rotary embedding: the cos|sin cache per position that
    the attention backend applies (``rotate_and_write_kv``, with the KV write)."""

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
