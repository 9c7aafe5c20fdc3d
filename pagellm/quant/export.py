"""`pagellm quantize MODEL OUT --method int4`: a quantized checkpoint that loads
without calibrating or quantizing again.

The model is built by the engine exactly as ``quantization=METHOD`` builds it
at load (calibration pass included), then every parameter is written under the
checkpoint name it was loaded from, so the same per-tensor loaders read it
back: a merged layer's per-row parameters (codes, scales, zero points, bias)
are split back into the checkpoint's projections (``q_proj.qweight``, ...);
its input smoothing, shared by those projections (they read the same input),
is written under each. The folder is an ordinary HF folder (``config.json``
with a ``quantization_config``, ``model.safetensors``, the tokenizer files).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagellm.config import EngineConfig, add_engine_arguments
from pagellm.kernels.torch_quant import INT4_PACKING
from pagellm.model.layers import Linear
from pagellm.quant import GROUP_SIZE, SAVABLE_FORMATS, SAVED_METHOD

SHARED_PARAMETERS = ("input_scale",)     # one vector for all shards of a merged layer


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every parameter of a built model."""
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, Linear):
                yield from _linear_tensors(model, prefix, module, name, param.data)
            else:
                yield f"model.{prefix}.{name}", param.data


def _linear_tensors(model, prefix: str, layer: Linear, name: str, data: torch.Tensor
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    for shard, weight_name in enumerate(model.checkpoint_names(prefix)):
        base = weight_name.removesuffix(".weight")
        if name in SHARED_PARAMETERS:
            yield f"{base}.{name}", data
        else:
            yield f"{base}.{name}", data.narrow(0, layer.output_offsets[shard], layer.output_sizes[shard])


def save_quantized(llm, out: Path) -> None:
    """Write the engine's model (built with a savable quantization) to ``out``."""
    engine = llm.engine
    if engine.quantization not in SAVABLE_FORMATS:
        raise ValueError(f"quantization {engine.quantization!r} cannot be saved (savable: {', '.join(SAVABLE_FORMATS)})")
    from pagellm.model.checkpoint import open_checkpoint
    checkpoint = open_checkpoint(engine.config.model)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").clone() for name, tensor in checkpoint_tensors(engine.runner.model)}
    stored = "int4" if engine.quantization == "int4-awq" else engine.quantization
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(checkpoint.source.config_dict)
    config["torch_dtype"] = str(engine.runner.dtype).removeprefix("torch.")
    config["quantization_config"] = {"quant_method": SAVED_METHOD, "format": stored, "group_size": GROUP_SIZE,
                                     "smoothed": any(name.endswith(".input_scale") for name in tensors),
                                     "source": str(engine.config.model), "method": engine.quantization,
                                     "int4_packing": INT4_PACKING}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if engine.tokenizer is not None:
        engine.tokenizer.save_pretrained(out)


def register(subparsers: argparse._SubParsersAction) -> None:
    from pagellm.model.zoo import DEFAULT_MODEL
    p = subparsers.add_parser("quantize", help="write a quantized checkpoint (safetensors + config) of MODEL")
    add_engine_arguments(p, DEFAULT_MODEL)
    p.add_argument("out", help="output folder")
    p.add_argument("--method", required=True, choices=SAVABLE_FORMATS,
                   help="int8 / int4 (round-to-nearest), int4-awq (AWQ scale search), w8a8 (SmoothQuant)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pagellm.llm import LLM

    config = replace(EngineConfig.from_args(args), quantization=args.method, num_kv_blocks=4,
                     enforce_eager=True)
    out = Path(args.out)
    save_quantized(LLM(config), out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({args.method}, {size / 2**20:,.1f} MiB)")
    return 0
