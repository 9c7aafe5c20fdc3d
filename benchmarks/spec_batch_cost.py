"""When speculation stops paying with batch size: the cost of one
verification step (k+1 query tokens per sequence) against one decode step (1
token per sequence), for B sequences at a given context, on the engine's own
worker path. With acceptance rate a, a verification step yields on average
E = (1 - a^(k+1)) / (1 - a) tokens per sequence (n-gram: no draft cost), so it
pays while E > verify / decode; the table gives the acceptance rate needed
for each B (the ``speculative_max_batch`` rule's basis).

    python benchmarks/spec_batch_cost.py --model qwen2.5-coder-0.5b --context 256 --k 4
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.engine.step import build_step_input
from pagellm.spec.proposal import Proposal


def break_even(ratio: float, k: int) -> float | None:
    """The acceptance rate a at which (1 - a^(k+1)) / (1 - a) = ratio (None: never, even at a = 1)."""
    if ratio >= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** i for i in range(k + 1)) < ratio else (lo, mid)
    return lo


def step_seconds(llm: LLM, seqs: list[Sequence], k: int, repeats: int) -> float:
    engine = llm.engine
    batch = ScheduledBatch()
    for seq in seqs:
        batch.add(seq, 1)
        if k:
            batch.proposals[seq] = Proposal(seq.token_ids[-k:])
    step = build_step_input(batch, engine.config.block_size, [])
    engine.runner.execute(step)   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.runner.execute(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    llm = LLM(args.model, dtype="float32", quantization=args.quantization, kv_cache_memory="1GiB",
              max_model_len=args.context + 64)
    engine, size = llm.engine, llm.engine.config.block_size
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(max(args.batches)):   # contexts in the pool (their K/V content does not matter for timing)
        prompt = torch.randint(0, engine.model_config.vocab_size, (args.context,), generator=g).tolist()
        seq = Sequence(i, str(i), 0, prompt, SamplingParams(temperature=0), 0, 0.0)
        engine.block_manager.allocate(seq, args.context + args.k + 1)
        seq.num_computed_tokens = args.context - 1
        seqs.append(seq)
    rows = []
    for b in args.batches:
        decode = step_seconds(llm, seqs[:b], 0, args.repeats)
        verify = step_seconds(llm, seqs[:b], args.k, args.repeats)
        rows.append({"batch": b, "decode_ms": decode * 1e3, "verify_ms": verify * 1e3, "ratio": verify / decode,
                     "break_even_acceptance": break_even(verify / decode, args.k)})
        print(f"B={b:>3}: decode {decode * 1e3:8.1f} ms, verify (k={args.k}) {verify * 1e3:8.1f} ms, "
              f"ratio {verify / decode:5.2f}, pays above acceptance {rows[-1]['break_even_acceptance']}", flush=True)
    payload = {"benchmark": "spec_batch_cost", "date": datetime.date.today().isoformat(),
               "command": "benchmarks/spec_batch_cost.py " + " ".join(__import__("sys").argv[1:]),
               "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
               "versions": {"python": platform.python_version(), "torch": torch.__version__},
               "model": args.model, "quantization": args.quantization, "context": args.context, "k": args.k,
               "uptime_before": uptime_before,
               "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
               "figures": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
