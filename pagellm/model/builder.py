"""Building a model: its layers on the target device, then its weights.

Weights arrive as a stream of ``(Hugging Face name, tensor)`` pairs, from a
checkpoint (``checkpoint.open_checkpoint(...).tensors()``) or from
``random_weights`` (real shapes, random values, for benchmarks). Either way
each tensor goes to its parameter's ``weight_loader`` (see ``layers``), which
decides how it is stored, so a quantized or sharded layer loads the same
stream. For a quantized KV cache the loaded q|k|v projections then get key
smoothing folded in (``key_smoothing``). Layers are created with ``torch.empty`` directly on the device: no
throw-away initialisation, no copy.

With weight offload (``host_layers``) the last layers are created in host
memory instead (pinned, for copies to a GPU), the rest on the device, before
any weight is read: each checkpoint tensor (or random tensor, made on the
device) is then copied straight to its final home, so the host never holds
more than the offloaded layers plus the tensor being loaded (a Llama-3-70B
shape with 80 GB on the device needs ~60 GB of host memory, not 141). With
``host_file`` (``disk_offload``) those layers are views of a file's shared
mapping, so they are loaded into the file's pages, not into memory of their own.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pagellm.distributed.groups import SINGLE, TensorGroup
from pagellm.model import key_smoothing, offload
from pagellm.model.config import ModelConfig, expected_shapes, weight_name
from pagellm.model.layers import LayerFactory, LinearMethod, default_weight_loader, dense_everywhere
from pagellm.model.llama import LlamaForCausalLM


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                weights: Iterable[tuple[str, torch.Tensor]],
                linear_method: Callable[[str], LinearMethod] = dense_everywhere, tp: TensorGroup = SINGLE,
                layer_range: tuple[int, int] | None = None, key_smoothing_alpha: float | None = None,
                host_layers: int = 0, pin_host_layers: bool = False, host_file: Path | None = None
                ) -> LlamaForCausalLM:
    """The model on ``device`` with every parameter filled from ``weights``
    (this tensor rank's slices of pipeline stage ``layer_range``'s tensors;
    the stream's other tensors are skipped), and key smoothing with exponent
    ``key_smoothing_alpha`` folded in when one is given; ValueError when the stream lacks a tensor or holds one
    with no place. The last ``host_layers`` decoder layers live in host memory (pinned with
    ``pin_host_layers``), or in a safetensors file mapped into it (``host_file``)."""
    with torch.device(device):
        model = LlamaForCausalLM(config, LayerFactory(dtype, linear_method, tp), layer_range, host_layers)
    host = list(model.layers)[len(model.layers) - host_layers:] if host_layers else []
    if host_file is not None:
        offload.map_into_file(host, host_file)
    elif pin_host_layers:
        for layer in host:
            for param in layer.parameters():   # their pages are untouched until now: one layer at a time
                param.data = param.data.pin_memory()
    num_tensors = len(expected_shapes(config))
    loaded = load_weights(model, tqdm(((name, tensor) for name, tensor in weights if model.holds(name)),
                                      total=num_tensors, desc="loading weights", unit="tensor", leave=False))
    missing = {name for name in expected_shapes(config) if model.holds(name)} - {weight_name(name)
                                                                                 for name in loaded}
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    if key_smoothing_alpha is not None:
        key_smoothing.smooth_keys(model, key_smoothing_alpha)
    return model.eval()


def load_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Hand each checkpoint tensor to its layer's loader for it (merged
    projections through ``packed_modules_mapping``); returns the names loaded."""
    loaded: set[str] = set()
    for name, tensor in weights:
        try:
            _loader_of(model, name)(tensor)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        loaded.add(name)
    return loaded


def _loader_of(model: LlamaForCausalLM, name: str) -> Callable[[torch.Tensor], None]:
    target, shard_id = _parameter_of(model, name)
    module_name, _, leaf = target.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    loader = getattr(module, "weight_loaders", {}).get(leaf)
    if loader is not None:
        return lambda tensor: loader(tensor, shard_id)
    param = getattr(module, leaf, None)
    if not isinstance(param, torch.nn.Parameter):
        raise ValueError("this checkpoint tensor has no place in the model")
    return lambda tensor: default_weight_loader(param, tensor)


def _parameter_of(model: LlamaForCausalLM, name: str) -> tuple[str, int | None]:
    """``model.layers.0.self_attn.k_proj.weight`` -> (``layers.0.self_attn.qkv_proj.weight``, 1)."""
    name = name.removeprefix("model.")
    for part, (merged, shard_id) in model.packed_modules_mapping.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{merged}."), shard_id
    return name, None


def random_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                   seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint of ``config``'s shapes with N(0, 0.02) values (norms 1),
    generated on ``device`` one tensor at a time."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
        else:
            yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
