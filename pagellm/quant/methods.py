"""Quantized ``LinearMethod``s: how a layer holds codes and scales, loads them
(quantizing a float checkpoint tensor on the way, or copying a quantized
checkpoint's own codes) and multiplies with them.

Every method keeps the layer's output rows in checkpoint order, so a merged
layer (q|k|v, gate|up) loads each shard into its own rows exactly as the dense
method does; quantization never crosses a row, which makes shards independent.
``apply`` dispatches to a fused kernel where one fits (``kernels.quant_ops``)
and to the torch reference otherwise.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from pagellm.kernels import cpu_linear, quant_ops
from pagellm.kernels.torch_quant import (PACK_RUN, dequantize_gguf, dequantize_int4, dequantize_int8,
                                         gguf_row_bytes, quantize_int4, quantize_int8)
from pagellm.model.layers import Linear, read

FLOAT_GGUF_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _parameter(layer: Linear, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    layer.register_parameter(name, param)
    layer.weight_loaders[name] = functools.partial(layer.load_rows, param)
    return param


class _InputSmoothing:
    """Activation-aware scaling shared by the calibrated formats (SmoothQuant's
    smoothing, AWQ's scales): the layer computes ``(x / s) @ (W * s)^T``, which
    is ``x @ W^T`` exactly before quantization but moves quantization error from
    the input channels that carry large activations to the weights (or back).
    ``s`` is per input channel; the layer keeps ``input_scale = 1 / s``
    (``fp32 [K]``, one vector for every shard of a merged layer, as they share
    their input). ``smoothing``: the ``s`` found by a calibration pass, applied to
    float weights as they load; ``smoothed``: a saved checkpoint's layer, whose
    ``input_scale`` is loaded like any tensor."""

    def __init__(self, smoothing: torch.Tensor | None = None, smoothed: bool = False) -> None:
        self.smoothing = smoothing
        self.smoothed = smoothed or smoothing is not None

    def _create_input_scale(self, layer: Linear) -> None:
        if not self.smoothed:
            return
        param = nn.Parameter(torch.ones(layer.input_size, dtype=torch.float32), requires_grad=False)
        layer.register_parameter("input_scale", param)
        if self.smoothing is not None:
            param.data.copy_(1.0 / layer.input_part(self.smoothing.float()))
        layer.weight_loaders["input_scale"] = lambda tensor, shard_id: param.data.copy_(layer.input_part(read(tensor)))

    def _smooth_weight(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.smoothing is None else tensor.float() * self.smoothing.to(tensor.device).float()

    def _smooth_input(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return x * layer.input_scale.to(x.dtype) if self.smoothed else x

    def _input_scale(self, layer: Linear) -> torch.Tensor | None:
        return layer.input_scale if self.smoothed else None


class _ScaledRows:
    """Methods with a scale per output row (and group): scaling a row of W is scaling its scales, exactly."""

    def scale_rows(self, layer: Linear, factors: torch.Tensor) -> None:
        scales = layer.scales.data
        scales.copy_(scales.float() * factors.to(scales.device).view(-1, *(1,) * (scales.dim() - 1)))


class Int8LinearMethod(_InputSmoothing, _ScaledRows):
    """Weight-only int8, one fp32 scale per output channel: ``qweight int8 [N, K]``, ``scales [N]``."""

    def create_weights(self, layer: Linear) -> None:
        qweight = _parameter(layer, "qweight", (layer.output_size, layer.input_size), torch.int8)
        scales = _parameter(layer, "scales", (layer.output_size,), torch.float32)
        self._create_input_scale(layer)

        def load_float(tensor: torch.Tensor, shard_id: int | None) -> None:
            q, scale = quantize_int8(self._smooth_weight(read(tensor)))
            layer.load_rows(qweight, q, shard_id)
            layer.load_rows(scales, scale, shard_id)

        layer.weight_loaders["weight"] = load_float

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.int8_linear(self._smooth_input(layer, x), layer.qweight, layer.scales, layer.bias)

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return (layer.qweight[ids].float() * layer.scales[ids, None]).to(layer.params_dtype)


class W8A8LinearMethod(Int8LinearMethod):
    """SmoothQuant: int8 weights as ``Int8LinearMethod`` (smoothed by a
    calibration pass), activations quantized to int8 per token at run time, an
    int8 x int8 -> int32 matmul; the smoothing is folded into the activations' quantization (one pass)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.w8a8_linear(x, layer.qweight, layer.scales, layer.bias, self._input_scale(layer))


class Int4LinearMethod(_InputSmoothing, _ScaledRows):
    """Weight-only int4, asymmetric, groups of ``group_size`` along the input:
    ``qweight uint8 [N, K/2]`` (two codes a byte), ``scales fp16 [N, K/G]``,
    ``zeros uint8 [N, K/G]``; with AWQ scales when calibrated."""

    def __init__(self, group_size: int = 128, smoothing: torch.Tensor | None = None, smoothed: bool = False
                 ) -> None:
        super().__init__(smoothing, smoothed)
        self.group_size = group_size

    def create_weights(self, layer: Linear) -> None:
        if layer.input_size % self.group_size:
            raise ValueError(f"int4 groups of {self.group_size} do not divide the input size {layer.input_size}")
        if layer.input_size % PACK_RUN:
            raise ValueError(f"int4 codes are packed in runs of {PACK_RUN} input columns, which do not divide "
                             f"the input size {layer.input_size}")
        groups = layer.input_size // self.group_size
        qweight = _parameter(layer, "qweight", (layer.output_size, layer.input_size // 2), torch.uint8)
        scales = _parameter(layer, "scales", (layer.output_size, groups), torch.float16)
        zeros = _parameter(layer, "zeros", (layer.output_size, groups), torch.uint8)
        self._create_input_scale(layer)

        def load_float(tensor: torch.Tensor, shard_id: int | None) -> None:
            for param, value in zip((qweight, scales, zeros), quantize_int4(self._smooth_weight(read(tensor)),
                                                                            self.group_size)):
                layer.load_rows(param, value, shard_id)

        layer.weight_loaders["weight"] = load_float

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.int4_linear(self._smooth_input(layer, x), layer.qweight, layer.scales, layer.zeros,
                                     layer.bias)

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(layer.qweight[ids], layer.scales[ids], layer.zeros[ids], layer.params_dtype)


def _mapped(blocks: np.ndarray) -> torch.Tensor:
    """The file's memory-mapped blocks as a tensor, not copied (only ever copied from)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch warns that the read-only map is not writable
        return torch.from_numpy(blocks)


@dataclass(frozen=True)
class _ShardGroup:
    """Consecutive shards of a GGUF layer held in one set of parameters (named ``..._{first}``): a float
    or raw-blocks shard alone, or a run of shards packed alike for the CPU, their rows stacked."""
    first: int
    shards: tuple[int, ...]
    kind: str                   # "float", "blocks", "int4" or "int8"


class GGUFLinearMethod:
    """A GGUF file's own blocks, one ``uint8 [rows, row bytes]`` tensor per
    shard (``qweight_i``; float types as ``weight_i``), since the shards of a
    merged layer may be stored in different types (Q5_0 q and k, Q8_0 v).

    ``cpu_packed``: each quantized shard is instead repacked as it loads into
    the layout of torch's packed CPU matmuls (``quant_ops.pack_gguf_for_cpu``:
    ``qweight`` and ``scales``; Q4_K keeps its codes, other types become
    per-row int8), consecutive shards packed alike share one matmul (q|k|v,
    gate|up), and the layer multiplies in bf16. ``lookups``: the layer serves
    embedding lookups, so packed it is int8 even where Q4_K could stay int4
    (the int4 layout interleaves rows; int8's rows are the matrix's rows).
    One instance per layer (it keeps the layer's shard groups)."""

    def __init__(self, shard_types: list[GGMLQuantizationType], cpu_packed: bool = False, lookups: bool = False
                 ) -> None:
        self.shard_types = shard_types
        self.cpu_packed = cpu_packed
        self.lookups = lookups
        self.groups: list[_ShardGroup] = []

    def create_weights(self, layer: Linear) -> None:
        if len(self.shard_types) != len(layer.output_sizes):
            raise ValueError(f"{len(self.shard_types)} GGUF tensors for {len(layer.output_sizes)} shards")
        self.groups = self._group(layer.output_sizes)
        for group in self.groups:
            rows = sum(layer.output_sizes[i] for i in group.shards)
            for name, shape, dtype in self._parameters(group, layer.input_size, rows):
                param = nn.Parameter(torch.empty(shape, dtype=dtype or layer.params_dtype), requires_grad=False)
                layer.register_parameter(f"{name}_{group.first}", param)
        layer.weight_loaders["weight"] = functools.partial(self._load, layer)

    def _group(self, output_sizes: list[int]) -> list[_ShardGroup]:
        groups: list[_ShardGroup] = []
        for i, (rows, qtype) in enumerate(zip(output_sizes, self.shard_types)):
            kind = ("float" if qtype in FLOAT_GGUF_TYPES else "blocks" if not self.cpu_packed else
                    "int4" if quant_ops.packs_as_int4(qtype, rows) and not self.lookups else "int8")
            last = groups[-1] if groups else None
            if last is not None and last.kind == kind and (kind == "int8" or kind == "int4" and sum(
                    output_sizes[j] for j in last.shards) % quant_ops.INT4PACK_ROWS == 0):
                groups[-1] = _ShardGroup(last.first, (*last.shards, i), kind)
            else:
                groups.append(_ShardGroup(i, (i,), kind))
        return groups

    def _parameters(self, group: _ShardGroup, cols: int, rows: int):
        """(name, shape, dtype: None for the layer's) of one group's parameters."""
        if group.kind == "float":
            return [("weight", (rows, cols), None)]
        if group.kind == "blocks":
            return [("qweight", (rows, gguf_row_bytes(self.shard_types[group.first], cols)), torch.uint8)]
        if group.kind == "int4":
            return [("qweight", (rows, cols // 2), torch.uint8),
                    ("scales", (cols // quant_ops.INT4PACK_GROUP, rows, 2), quant_ops.CPU_MATMUL_DTYPE)]
        return [("qweight", (rows, cols), torch.int8), ("scales", (rows,), quant_ops.CPU_MATMUL_DTYPE)]

    def _load(self, layer: Linear, tensor, shard_id: int | None) -> None:
        """``tensor``: a ``RawTensor`` (still quantized) or a float tensor (float types)."""
        index = shard_id or 0
        qtype = self.shard_types[index]
        group = next(g for g in self.groups if index in g.shards)
        if group.kind == "float":
            values = {"weight": layer.shard_of(tensor, shard_id)}
        else:
            if getattr(tensor, "tensor_type", None) != qtype:
                raise ValueError(f"expected the file's {qtype.name} blocks")
            blocks = _mapped(tensor.data)   # a rank copies only its part of the file's blocks
            if group.kind == "int8":    # requantized per row over the whole tensor, then cut, as one process holds it
                packed = quant_ops.pack_gguf_for_cpu(blocks, qtype, int4=False)
                values = {name: layer.shard_of(value, shard_id) for name, value in zip(("qweight", "scales"), packed)}
            elif group.kind == "int4":  # Q4_K codes depend on their own group only: cut, then pack
                values = dict(zip(("qweight", "scales"),
                                  quant_ops.pack_gguf_for_cpu(layer.shard_of(blocks, shard_id), qtype, int4=True)))
            else:
                values = {"qweight": layer.shard_of(blocks, shard_id)}
        offset = sum(layer.output_sizes[i] for i in group.shards[:group.shards.index(index)])
        for name, value in values.items():
            row_dim = 1 if name == "scales" and group.kind == "int4" else 0
            target = getattr(layer, f"{name}_{group.first}").data.narrow(row_dim, offset, layer.output_sizes[index])
            if target.shape != value.shape:
                raise ValueError(f"checkpoint tensor of shape {tuple(value.shape)} does not fit "
                                 f"{tuple(target.shape)}")
            target.copy_(value)

    def _matmul(self, layer: Linear, group: _ShardGroup, x: torch.Tensor, xq: torch.Tensor | None) -> torch.Tensor:
        """One group's ``x @ W^T`` (``xq``: ``x`` as ``[M, K]`` bf16, for the packed groups)."""
        if group.kind == "float":
            return cpu_linear.linear(x, getattr(layer, f"weight_{group.first}"), None)
        qweight = getattr(layer, f"qweight_{group.first}")
        if group.kind == "blocks":
            return quant_ops.gguf_linear(x, qweight, self.shard_types[group.first])
        out = quant_ops.gguf_cpu_linear(xq, qweight, getattr(layer, f"scales_{group.first}"))
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        xq = x.reshape(-1, x.shape[-1]).to(quant_ops.CPU_MATMUL_DTYPE) if self.cpu_packed else None
        outs = [self._matmul(layer, group, x, xq) for group in self.groups]
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return out if layer.bias is None else out + layer.bias

    def embed(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        (group,) = self.groups
        if group.kind == "float":
            return F.embedding(ids, layer.weight_0)
        flat = ids.reshape(-1)
        if group.kind == "int8":
            rows = dequantize_int8(layer.qweight_0[flat], layer.scales_0[flat], layer.params_dtype)
        else:   # "blocks" ("int4" is never made for lookups)
            rows = dequantize_gguf(layer.qweight_0[flat], self.shard_types[0], layer.params_dtype)
        return rows.reshape(*ids.shape, layer.input_size)
