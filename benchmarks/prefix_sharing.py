"""Shared-prefix workload with the prefix cache on and off: prefill tokens
computed, peak KV blocks, mean TTFT and throughput.

    python benchmarks/prefix_sharing.py --model qwen2.5-coder-0.5b --requests 16 --prefix-len 512
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time

import torch

from pagellm import LLM, SamplingParams


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prefill_before = engine.scheduler.stats.num_prefill_tokens
    hits_before = engine.block_manager.stats.hit_tokens
    start = time.perf_counter()
    ids = llm._submit(prompts, params)
    first_token: dict[str, float] = {}
    peak_blocks = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            first_token.setdefault(out.request_id, time.perf_counter() - start)
        peak_blocks = max(peak_blocks, engine.block_manager.num_used_blocks)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prefill_tokens_computed": stats["num_prefill_tokens"] - prefill_before, "peak_kv_blocks": peak_blocks,
            "mean_ttft_s": sum(first_token[i] for i in ids) / len(ids),
            "output_tokens_per_s": len(ids) * max_tokens / elapsed, "elapsed_s": elapsed,
            "prefix_cache_hit_tokens": engine.block_manager.stats.hit_tokens - hits_before,
            "prompt_tokens": prompt_tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    results = {}
    for caching in (True, False):
        llm = LLM(args.model, dtype=args.dtype, random_weights=args.random_weights, kv_cache_memory=args.kv_cache_memory,
                  enable_prefix_caching=caching, max_model_len=args.prefix_len + args.suffix_len + args.max_tokens)
        vocab = llm.engine.model_config.vocab_size
        prefix = torch.randint(0, vocab, (args.prefix_len,), generator=g.manual_seed(0)).tolist()
        prompts = [prefix + torch.randint(0, vocab, (args.suffix_len,), generator=g).tolist()
                   for _ in range(args.requests)]
        run(llm, [torch.randint(0, vocab, (64,), generator=g).tolist()], 2)   # warm-up, shares nothing
        results["cache_on" if caching else "cache_off"] = run(llm, prompts, args.max_tokens)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    on, off = results["cache_on"], results["cache_off"]
    record = {"benchmark": "prefix_sharing", "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "workload": vars(args), **results,
              "ratios": {"prefill_tokens": off["prefill_tokens_computed"] / on["prefill_tokens_computed"],
                         "peak_kv_blocks": off["peak_kv_blocks"] / on["peak_kv_blocks"],
                         "ttft": off["mean_ttft_s"] / on["mean_ttft_s"],
                         "throughput": on["output_tokens_per_s"] / off["output_tokens_per_s"]}}
    print(f"{'':22}{'cache on':>12}{'cache off':>12}")
    for key in ("prefill_tokens_computed", "peak_kv_blocks", "mean_ttft_s", "output_tokens_per_s"):
        print(f"{key:22}{on[key]:>12.4g}{off[key]:>12.4g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
