"""Memory the CUDA graphs keep, and whether an engine sized by default (no KV
or GPU budget: the pool takes what is free less one reserve per model for the
graphs) then serves a long prompt, on one GPU (random Llama-3-8B shapes).

For each weight format an engine is built in a fresh process; the script
records the free memory left after start-up (what the graphs and the
allocator left of the reserve) and runs one ``--prompt-tokens`` prompt (eager
prefill chunks: the largest activations) and a batch of decodes. ``--tree``
runs the same measurement on another checkout (e.g. the previous revision) so
that both land in one result file from one machine.

    PYTHONPATH=. python3 benchmarks/graph_memory_gpu.py --out $OUT [--tree OTHER_CHECKOUT]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def measure(quantization: str, prompt_tokens: int) -> dict:
    import random

    import torch

    from pagellm import LLM, SamplingParams
    llm = LLM("llama-3-8b", random_weights=True, quantization=quantization)
    free, total = torch.cuda.mem_get_info()
    graphs = llm.engine.runner.graphs
    memory = llm.engine.memory
    gib = 2**30
    row = dict(quantization=quantization, free_after_start_gib=free / gib, total_gib=total / gib,
               kv_tokens=memory.kv_tokens, graphs=len(graphs.shapes) if graphs else 0,
               weights_gib=memory.weights_bytes / gib, activation_gib=memory.activation_bytes / gib,
               kv_pool_gib=memory.kv_cache_bytes / gib,
               # what start-up keeps beyond the weights and the pool: the graphs' pool, their buffers, workspaces
               other_allocated_gib=(torch.cuda.memory_allocated() - memory.weights_bytes
                                    - memory.kv_cache_bytes) / gib,
               reserved_unallocated_gib=(torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / gib)
    rng = random.Random(0)
    long_prompt = [rng.randrange(100, 120000) for _ in range(prompt_tokens)]
    decodes = [[rng.randrange(100, 120000) for _ in range(64)] for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    try:
        out = llm.generate([long_prompt] + decodes, params, use_tqdm=False)
        row["served"] = all(len(o.outputs[0].token_ids) == 16 for o in out)
        if not row["served"]:
            row["error"] = next((str(o.error) for o in out if getattr(o, "error", None)), "short outputs")
    except torch.OutOfMemoryError as error:
        row["served"] = False
        row["error"] = str(error).splitlines()[0]
    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--formats", default="none,int4")
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--tree", help="another checkout measured the same way (its rows labelled 'other')")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # child process: one format, JSON on stdout
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(measure(args.one, args.prompt_tokens)), flush=True)
        return 0
    rows = []
    trees = [("this", Path.cwd())] + ([("other", Path(args.tree).resolve())] if args.tree else [])
    for label, tree in trees:
        for fmt in args.formats.split(","):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", fmt,
                                   "--prompt-tokens", str(args.prompt_tokens)], cwd=tree, env=env,
                                  capture_output=True, text=True)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[0]) if found else dict(quantization=fmt, served=False,
                                                          error=proc.stderr.strip().splitlines()[-1:])
            rows.append(dict(tree=label, **row))
            print(rows[-1], flush=True)
    import torch
    import triton
    payload = {"benchmark": "graph_memory_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": "PYTHONPATH=. python3 benchmarks/graph_memory_gpu.py " + " ".join(sys.argv[1:]),
               "device": torch.cuda.get_device_name(),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "triton": triton.__version__}, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "graph_memory_gpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("=== summary")
    for r in rows:
        print(f"{r['tree']:>5} {r['quantization']:>5}: served {r['served']}, free after start "
              f"{r.get('free_after_start_gib', float('nan')):.2f} GiB, graphs {r.get('graphs')}, "
              f"KV tokens {r.get('kv_tokens')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
