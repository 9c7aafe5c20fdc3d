"""When speculation stops paying with batch size: the cost of one
verification step (k+1 query tokens per sequence) against one decode step (1
token per sequence), for B sequences at a given context, on the engine's own
worker path (CUDA graphs included). With acceptance rate a, a verification
step yields on average E = (1 - a^(k+1)) / (1 - a) tokens per sequence
(n-gram: no draft cost), so it pays while E > verify / decode; the table gives
the acceptance rate needed for each B and k (the ``speculative_max_batch``
rule's basis).

    python benchmarks/spec_batch_cost.py --model qwen2.5-coder-0.5b --context 256 --k 4
    # the H200 figures: benchmarks/spec_gpu.py (random Llama-3-8B, bf16)
    python benchmarks/spec_batch_cost.py --model llama-3-8b --random-weights --dtype bfloat16 --k 1 2 4
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.block_manager import BlockManager
from pagellm.engine.llm_engine import LLMEngine
from pagellm.engine.model_runner import ModelRunner
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


def step_seconds(runner: ModelRunner, block_size: int, seqs: list[Sequence], k: int, repeats: int) -> float:
    """Median seconds of one step of ``seqs`` (each at its last token), verifying k proposals each (k = 0: decode)."""
    batch = ScheduledBatch()
    for seq in seqs:
        batch.add(seq, 1)
        if k:
            batch.proposals[seq] = Proposal(seq.token_ids[-k:])
    step = build_step_input(batch, block_size, [])
    runner.execute(step)   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(step)   # waits for the device: it returns the sampled tokens
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def contexts(block_manager: BlockManager, vocab: int, count: int, context: int, lookahead: int) -> list[Sequence]:
    """``count`` sequences of ``context`` random tokens holding blocks for ``lookahead`` more
    (their K/V content does not matter for timing)."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(count):
        seq = Sequence(i, str(i), 0, torch.randint(0, vocab, (context,), generator=g).tolist(),
                       SamplingParams(temperature=0), 0, 0.0)
        block_manager.allocate(seq, context + lookahead + 1)
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return seqs


def measure(engine: LLMEngine, context: int, ks: list[int], batches: list[int], repeats: int) -> list[dict]:
    """Per batch size: the decode step, and per k the verification step, its ratio
    to decode and the acceptance rate it breaks even at. The sequences are freed after."""
    seqs = contexts(engine.block_manager, engine.model_config.vocab_size, max(batches), context, max(ks))
    rows = []
    try:
        for b in batches:
            decode = step_seconds(engine.runner, engine.config.block_size, seqs[:b], 0, repeats)
            row = {"batch": b, "decode_ms": decode * 1e3}
            for k in ks:
                verify = step_seconds(engine.runner, engine.config.block_size, seqs[:b], k, repeats)
                row[f"k{k}"] = {"verify_ms": verify * 1e3, "ratio": verify / decode,
                                "break_even_acceptance": break_even(verify / decode, k)}
            rows.append(row)
            print(f"B={b:>3}: decode {decode * 1e3:7.2f} ms; " + "; ".join(
                f"k={k} {row[f'k{k}']['ratio']:.2f}x (pays above a={row[f'k{k}']['break_even_acceptance']})"
                for k in ks), flush=True)
    finally:
        for seq in seqs:
            engine.block_manager.free(seq)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, random_weights=args.random_weights,
              kv_cache_memory="1GiB", max_model_len=args.context + max(args.k) + 64)
    rows = measure(llm.engine, args.context, args.k, args.batches, args.repeats)
    device = llm.engine.runner.device
    payload = {"benchmark": "spec_batch_cost", "date": datetime.date.today().isoformat(),
               "command": "benchmarks/spec_batch_cost.py " + " ".join(sys.argv[1:]),
               "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"),
               "versions": {"python": platform.python_version(), "torch": torch.__version__},
               "model": args.model + (" (random)" if args.random_weights else ""), "dtype": args.dtype,
               "quantization": args.quantization, "context": args.context, "uptime_before": uptime_before,
               "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
               "figures": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
