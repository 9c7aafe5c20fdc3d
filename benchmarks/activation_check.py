"""The engine's measured activation peak (CUDA) against the closed form of ``pagellm.sizing``.

For each case, ``pagellm memory MODEL --measure --json`` builds the engine with random weights and the
prediction's batch, context and prefill chunk; the engine measures its heaviest step (a full token budget,
every sequence sampling with every filter and penalty on) through its own step path. Then the same step
with greedy sampling (the forward and the logits alone) is measured on a worker built here, and set
beside the formula's forward phase. Prints one line per case and writes the JSON list to the path given.

Usage: PYTHONPATH=. python3 benchmarks/activation_check.py OUT.json
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import torch

from pagellm import sizing
from pagellm.config import EngineConfig
from pagellm.engine.model_runner import ModelRunner
from pagellm.engine.step import profile_step_input
from pagellm.model.builder import random_weights
from pagellm.model.model_spec import load_model_config
from pagellm.sampling_params import SamplingParams

CASES = [  # model, batch (sampled rows), context, prefill chunk (tokens per step)
    ("qwen2.5-0.5b", 8, 4096, 2048),
    ("llama-3-8b", 8, 4096, 2048),
    ("llama-3-8b", 256, 2048, 8192),
]


def forward_only_peak(model: str, batch: int, context: int, chunk: int) -> int:
    config = load_model_config(model)
    engine = EngineConfig(model, dtype="bfloat16", random_weights=True, max_num_seqs=batch,
                          max_num_batched_tokens=chunk, max_model_len=context)
    runner = ModelRunner(engine, config, random_weights(config, torch.bfloat16, "cuda"), context)
    step = profile_step_input(chunk, batch, context, engine.block_size)
    step.sampling.params = [SamplingParams(temperature=0)] * len(step.sampling.params)
    step.sampling = dataclasses.replace(step.sampling, row_keys=[], prompt_token_ids=None, output_token_ids=None)
    peak = runner.profile_activations(step)[0]
    del runner
    torch.cuda.empty_cache()
    return peak


results = []
for model, batch, context, chunk in CASES:
    cmd = [sys.executable, "-m", "pagellm.cli", "memory", model, "--dtype", "bf16", "--batch-size", str(batch),
           "--context-len", str(context), "--prefill-chunk", str(chunk), "--measure", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        results.append({"case": cmd[3:], "error": run.stderr[-2000:]})
        print(model, batch, context, chunk, "FAILED", run.stderr[-500:])
        continue
    out = json.loads(run.stdout)
    config = load_model_config(model)
    p = sizing.Precision()
    tokens = min(chunk, batch * context)
    forward_formula = sizing.activation_bytes(config, p, tokens, 0, context) if tokens * config.hidden_size else 0
    predicted, measured = out["memory"]["activation_bytes"], out["measured"]["activation_bytes"]
    greedy = forward_only_peak(model, batch, context, chunk)
    results.append({"model": model, "batch": batch, "context": context, "prefill_chunk": chunk,
                    "predicted_bytes": predicted, "measured_bytes": measured,
                    "measured": out["measured"]["activation_measured"], "ratio": measured / predicted,
                    "forward_formula_bytes": forward_formula, "greedy_step_measured_bytes": greedy,
                    "weights_ratio": out["measured"]["weights_bytes"] / out["memory"]["weights_bytes"],
                    "kv_per_token_equal": out["measured"]["kv_bytes_per_token"] == out["memory"]["kv_bytes_per_token"]})
    r = results[-1]
    mib = 2**20
    print(f"{model:<14} batch {batch:<4} ctx {context:<5} chunk {chunk:<5} activations predicted "
          f"{predicted / mib:8.1f} MiB, engine {measured / mib:8.1f} MiB ({r['ratio']:.3f}); forward "
          f"formula {forward_formula / mib:7.1f}, greedy step {greedy / mib:7.1f}; weights x{r['weights_ratio']:.4f}, "
          f"KV/token equal {r['kv_per_token_equal']}")
json.dump(results, open(sys.argv[1], "w"), indent=2)
