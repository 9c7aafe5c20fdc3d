"""Batch-1 decode speed of weight formats on the CPU, all in one process.

    python benchmarks/cpu_decode.py --model qwen2.5-coder-0.5b --formats none,gguf,int8 \
        --threads 1 --out benchmarks/results/cpu-2026-12-02-decode-0.5b.json

Every format is loaded once; then each repetition runs every format in turn
(so the machine's load hits all alike): a one-token request (the prompt pass)
and a ``--max-tokens`` request on the same code prompt, greedy. Decode
tokens/s is ``(max_tokens - 1) / (t_full - t_prompt)``, in wall seconds and in
this process's CPU seconds; the table gives medians over repetitions and the
ratio to the first format. On a shared 2-core machine two torch threads stall
at every op whose partner thread is descheduled (one matmul: 0.14 ms alone,
16 ms under load), so ``--threads 1`` gives the steadier comparison.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams

PROMPT = "def quicksort(arr: list[int]) -> list[int]:\n    \"\"\"Sort a list of integers in ascending order.\"\"\"\n"


def timed(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, wall seconds, CPU seconds) of one greedy request."""
    start, cpu = time.perf_counter(), time.process_time()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    return list(out), time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--formats", default="none,gguf,int8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llms = {}
    for fmt in args.formats.split(","):
        llms[fmt] = LLM(args.model, dtype="float32", quantization=fmt, num_kv_blocks=64, max_model_len=1024)
        gc.collect()
    prompt = next(iter(llms.values())).get_tokenizer().encode(PROMPT)
    samples: dict[str, list[dict]] = {fmt: [] for fmt in llms}
    outputs = {}
    load_before = os.getloadavg()
    for rep in range(args.reps + 1):                 # repetition 0 warms up
        for fmt, llm in llms.items():
            _, wall1, cpu1 = timed(llm, prompt, 1)
            tokens, wall, cpu = timed(llm, prompt, args.max_tokens)
            outputs[fmt] = tokens
            if rep:
                decoded = args.max_tokens - 1
                samples[fmt].append({"decode_tok_s": decoded / (wall - wall1), "decode_tok_cpu_s": decoded / (cpu - cpu1),
                                     "prompt_s": wall1, "total_tok_s": args.max_tokens / wall})
        print(f"rep {rep}: " + ", ".join(f"{fmt} {samples[fmt][-1]['decode_tok_s']:.2f} tok/s"
                                         for fmt in llms if rep), flush=True)
    first = next(iter(llms))
    rows = []
    for fmt in llms:
        med = {key: statistics.median(s[key] for s in samples[fmt]) for key in samples[fmt][0]}
        rows.append({"format": fmt, **med, "weights_bytes": llms[fmt].engine.memory.weights_bytes,
                     "same_tokens_as_" + first: outputs[fmt] == outputs[first], "samples": samples[fmt]})
    base = rows[0]
    print(f"\n{len(prompt)}-token prompt, {args.max_tokens} tokens, {torch.get_num_threads()} threads, medians of "
          f"{args.reps}")
    print(f"{'format':8} {'decode tok/s':>12} {'per CPU s':>10} {'x ' + first:>8} {'x (CPU)':>8} {'weights MiB':>12}")
    for r in rows:
        r["ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["cpu_ratio"] = r["decode_tok_cpu_s"] / base["decode_tok_cpu_s"]
        print(f"{r['format']:8} {r['decode_tok_s']:12.2f} {r['decode_tok_cpu_s']:10.2f} {r['ratio']:8.2f} "
              f"{r['cpu_ratio']:8.2f} {r['weights_bytes'] / 2**20:12,.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "benchmark": "cpu_decode", "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/cpu_decode.py " + " ".join(os.sys.argv[1:]),
            "device": f"cpu ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
                      f"{torch.get_num_threads()} threads)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "model": args.model, "prompt_tokens": len(prompt), "max_tokens": args.max_tokens, "reps": args.reps,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
