"""Tensor and pipeline parallelism on several GPUs of one host (nvidia-h200-x2): the issue's targets.

    PYTHONPATH=. python3 benchmarks/parallel_gpu.py --out $OUT [--sections tp,big,pp]

1. tp: ``pagellm bench latency`` on a Llama-3-8B shape (random bf16 weights,
   batch 1, 128 -> 128) at TP=1 and TP=2; target: TP=2 decode >= 1.6x TP=1
   tokens/s. (Greedy parity with one process is the CPU tests' check.)
2. big: a Llama-3-70B shape in bf16 loads and serves a short batch on TP=2.
3. pp: ``pagellm bench throughput`` on the 256-request workload at PP=1 and
   PP=2; target: PP=2 >= 1.7x one GPU's output tokens/s.
``--model``/``--small`` run the same sections on a small model (a CPU smoke run
with gloo). Everything goes into one JSON (``$OUT/parallel-gpu.json``); a table
is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
from bench_run import run_bench, run_section

SECTIONS = {  # name -> (bench kind, model, [(label, parallel flags)], bench flags)
    "tp": ("latency", "llama-3-8b", [("tp1", []), ("tp2", ["--tensor-parallel-size", "2"])],
           ["--batch-size", "1", "--input-len", "128", "--output-len", "128", "--num-iters", "3"]),
    "big": ("latency", "llama-3-70b", [("tp2", ["--tensor-parallel-size", "2"])],
            ["--batch-size", "4", "--input-len", "128", "--output-len", "32", "--num-iters", "1"]),
    "pp": ("throughput", "llama-3-8b", [("pp1", []), ("pp2", ["--pipeline-parallel-size", "2"])],
           ["--num-prompts", "256", "--input-len", "32-512", "--output-len", "256", "--ignore-eos"]),
}
KEYS = {"latency": "decode_tokens_per_s", "throughput": "output_tokens_per_s"}


def bench(kind: str, model: str, label: str, flags: list[str], args) -> dict:
    path = os.path.join(args.out, f"{kind}-{label}.json")
    weights = [] if os.path.exists(model) else ["--random-weights"]
    cmd = [sys.executable, "-m", "pagellm.cli", "bench", kind, model, *weights, "--json", path, *flags,
           *args.extra.split()]
    run = run_bench(cmd, path, args.bench_timeout)
    if "error" in run:
        return run
    data = run.pop("data")
    return run | {"results": data.get("results"), "memory": (data.get("runner") or {}).get("memory")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="tp,big,pp")
    parser.add_argument("--model", help="one model for every section instead of the shapes above (smoke runs)")
    parser.add_argument("--small", action="store_true", help="short runs: 2 -> 4 tokens, 8 requests")
    parser.add_argument("--extra", default="", help="more flags for every bench run, e.g. '--dtype float32'")
    parser.add_argument("--bench-timeout", type=int, default=540)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "PYTHONPATH=. python3 benchmarks/parallel_gpu.py " + " ".join(sys.argv[1:])}
    for name in args.sections.split(","):
        kind, model, variants, flags = SECTIONS[name]
        if args.small:
            flags = {"latency": ["--batch-size", "1", "--input-len", "2", "--output-len", "4", "--num-iters", "1"],
                     "throughput": ["--num-prompts", "8", "--input-len", "4", "--output-len", "4",
                                    "--ignore-eos"]}[kind]
        run_section(result, name, lambda: {label: bench(kind, args.model or model, label, [*parallel, *flags], args)
                                           for label, parallel in variants},
                    os.path.join(args.out, "parallel-gpu.json"))
    summarize(result)


def summarize(result: dict) -> None:
    print(f"\n{'section':8} {'variant':8} {'figure':22} {'value':>10} {'vs first':>9}")
    for name, (kind, _, variants, _) in SECTIONS.items():
        runs = result.get(name)
        if not isinstance(runs, dict):
            continue
        key, base = KEYS[kind], None
        for label, _ in variants:
            run = runs.get(label) or runs
            if "error" in run:
                print(f"{name:8} {label:8} ERROR {run['error'][-300:]}")
                continue
            value = run["results"][key]
            base = base or value
            print(f"{name:8} {label:8} {key:22} {value:10.1f} {value / base:8.2f}x")


if __name__ == "__main__":
    main()
