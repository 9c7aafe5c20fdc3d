"""Real layers for the GPU kernel check: weights of a few Qwen2.5-Coder-0.5B
projections and the activations that reach them on the calibration text,
captured on the CPU (the GPU machines have no model files), small enough to
travel with one device call.

    python benchmarks/quant_real_layers.py .gpu-data/qwen05-layers.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pagellm.config import EngineConfig
from pagellm.quant.calibrate import record_inputs

LAYERS = ("layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj",
          "layers.0.mlp.down_proj", "layers.23.self_attn.qkv_proj", "layers.23.mlp.down_proj")
ROWS = 64


def main(out: str) -> None:
    model, stats = record_inputs(EngineConfig(model="qwen2.5-coder-0.5b", dtype="float32"))
    modules = dict(model.named_modules())
    layers = {name: {"weight": modules[name].weight.detach().bfloat16().clone(),
                     "inputs": torch.cat(stats[name].samples)[:ROWS].bfloat16().clone()} for name in LAYERS}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": "qwen2.5-coder-0.5b", "layers": layers}, out)
    print(out, sum(t.numel() * t.element_size() for v in layers.values() for t in v.values()) / 2**20, "MiB")


if __name__ == "__main__":
    main(sys.argv[1])
