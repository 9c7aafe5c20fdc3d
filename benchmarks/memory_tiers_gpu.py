"""Memory tiers on one GPU, random Llama-3-8B weights (bf16), one process:

    PYTHONPATH=. python3 benchmarks/memory_tiers_gpu.py --out $OUT

1. copies: host<->device bandwidth of the KV swap path (``KVCache.swap``, 512
   blocks each way, pinned host pool) and of a plain pinned copy.
2. swap vs recompute: 16 prompts of 4,096 tokens + 128 generated, greedy, in a
   KV pool of half their demand; the same engine with swaps allowed
   (``swap_min_tokens`` 512) and with recompute only; wall time, preemptions,
   swaps, and whether the outputs match.
3. host prefix tier: a 4,096-token prompt computed, evicted from the device by
   other prompts, then asked again with a new last block: time of the first
   (computed) vs the second (restored from the host) request.
4. weight offload: batch-1 decode, 16 of 32 layers streamed from pinned host
   memory, against the bound (streamed bytes / measured host-to-device copy
   bandwidth + the same engine's all-resident eager step), and whether the tokens
   match the resident engine's.
Everything goes into ``$OUT/memory-tiers.json``; a table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import time

import torch

from pagellm import LLM, SamplingParams

MODEL = "llama-3-8b"


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copies(llm: LLM) -> dict:
    kv = llm.engine.runner.kv_cache
    n = min(512, kv.host_pool.shape[0], kv.num_blocks)
    pairs = [(i, i) for i in range(n)]
    nbytes = n * kv.spec.bytes_per_block
    kv.swap(pairs, [])   # warm-up
    out_s = min(timed(lambda: kv.swap(pairs, [])) for _ in range(3))
    in_s = min(timed(lambda: kv.swap([], pairs)) for _ in range(3))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d_s = min(timed(lambda: dev.copy_(host, non_blocking=True)) for _ in range(3))
    return {"blocks": n, "bytes": nbytes, "swap_out_gb_s": nbytes / out_s / 1e9, "swap_in_gb_s": nbytes / in_s / 1e9,
            "pinned_h2d_gb_s": nbytes / h2d_s / 1e9}


def swap_vs_recompute(llm: LLM) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(4096)] for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    engine = llm.engine
    result = {}
    for name, threshold in (("swap", 512), ("recompute", 10**9)):
        engine.scheduler.config.swap_min_tokens = threshold
        before = engine.stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = engine.stats()
        result[name] = {"seconds": seconds, "tokens": [o.outputs[0].token_ids for o in outs],
                        **{k: after[k] - before[k] for k in ("num_preemptions", "num_swapped_out", "kv_bytes_to_host",
                                                             "kv_bytes_to_device", "num_prefill_tokens")}}
    same = sum(a == b for a, b in zip(result["swap"].pop("tokens"), result["recompute"].pop("tokens")))
    return result | {"speedup": result["recompute"]["seconds"] / result["swap"]["seconds"],
                     "identical_outputs": f"{same}/16", "kv_pool_blocks": engine.block_manager.num_blocks,
                     "kv_demand_blocks": 16 * (4096 + 128) // 16}


def prefix_restore(llm: LLM) -> dict:
    rng = random.Random(1)
    prefix = [rng.randrange(1000, 100000) for _ in range(4096)]
    one = SamplingParams(temperature=0, max_tokens=1)
    engine = llm.engine
    llm.generate([[rng.randrange(1000, 100000) for _ in range(64)]], one, use_tqdm=False)   # warm
    first_s = timed(lambda: llm.generate([prefix + [7] * 16], one, use_tqdm=False))
    filler = [[rng.randrange(1000, 100000) for _ in range(4096)] for _ in range(engine.block_manager.num_blocks // 256 + 2)]
    for prompt in filler:
        llm.generate([prompt], one, use_tqdm=False)
    before = engine.stats()
    second_s = timed(lambda: llm.generate([prefix + [9] * 16], one, use_tqdm=False))
    after = engine.stats()
    return {"computed_s": first_s, "restored_s": second_s, "speedup": first_s / second_s,
            "host_hit_tokens": after["host_prefix_hit_tokens"] - before["host_prefix_hit_tokens"],
            "prefill_tokens": after["num_prefill_tokens"] - before["num_prefill_tokens"]}


def decode_ms(llm: LLM, prompt: list[int], n: int = 64) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)   # warm
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    one = SamplingParams(temperature=0, max_tokens=1)
    seconds = time.perf_counter() - start
    first = timed(lambda: llm.generate([prompt], one, use_tqdm=False))   # prefill + 1 token
    return (seconds - first) / (n - 1) * 1e3, out.outputs[0].token_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    figures: dict = {}
    common = dict(random_weights=True, dtype="bfloat16", max_model_len=8192, enforce_eager=True)
    llm = LLM(MODEL, kv_cache_memory="4GiB", swap_space="16GiB", **common)
    figures["copies"] = copies(llm)
    figures["swap_vs_recompute"] = swap_vs_recompute(llm)
    figures["prefix_restore"] = prefix_restore(llm)
    prompt = list(range(1000, 1128))
    resident_ms, resident_tokens = decode_ms(llm, prompt)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    layer_bytes = 436_224_000   # one Llama-3-8B decoder layer in bf16
    offloaded = LLM(MODEL, kv_cache_memory="4GiB", cpu_offload_memory=16 * layer_bytes, **common)
    memory = offloaded.engine.memory
    offload_ms, offload_tokens = decode_ms(offloaded, prompt)
    h2d = figures["copies"]["pinned_h2d_gb_s"] * 1e9
    bound_ms = resident_ms + memory.host_weights_bytes / h2d * 1e3
    figures["offload"] = {"offloaded_layers": memory.offloaded_layers, "layer_bytes": layer_bytes,
                          "host_weights_bytes": memory.host_weights_bytes,
                          "device_weights_bytes": memory.weights_bytes, "resident_eager_ms": resident_ms,
                          "offload_ms": offload_ms, "bound_ms": bound_ms, "ratio_to_bound": offload_ms / bound_ms,
                          "streamed_gb_s": memory.host_weights_bytes / ((offload_ms - resident_ms) / 1e3) / 1e9,
                          "tokens_match_resident": offload_tokens == resident_tokens}
    result = {"device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
                                                                   "python": platform.python_version()},
              "command": "PYTHONPATH=. python3 benchmarks/memory_tiers_gpu.py --out $OUT",
              "date": datetime.date.today().isoformat(), "model": f"{MODEL} shapes, random bf16 weights",
              "figures": figures}
    with open(f"{args.out}/memory-tiers.json", "w") as f:
        json.dump(result, f, indent=2)
    c, s, p, o = figures["copies"], figures["swap_vs_recompute"], figures["prefix_restore"], figures["offload"]
    print(json.dumps(figures, indent=1))
    print(f"swap copies: out {c['swap_out_gb_s']:.1f} GB/s, in {c['swap_in_gb_s']:.1f} GB/s, pinned copy "
          f"{c['pinned_h2d_gb_s']:.1f} GB/s")
    print(f"swap vs recompute: {s['swap']['seconds']:.2f} s vs {s['recompute']['seconds']:.2f} s = "
          f"{s['speedup']:.2f}x; preemptions {s['swap']['num_preemptions']} / {s['recompute']['num_preemptions']}, "
          f"outputs identical {s['identical_outputs']}")
    print(f"prefix 4k: computed {p['computed_s'] * 1e3:.1f} ms, restored {p['restored_s'] * 1e3:.1f} ms = "
          f"{p['speedup']:.1f}x (host hit {p['host_hit_tokens']} tokens)")
    print(f"offload {o['offloaded_layers']} layers: {o['offload_ms']:.1f} ms/token vs bound {o['bound_ms']:.1f} "
          f"(resident eager {o['resident_eager_ms']:.1f}) = {o['ratio_to_bound']:.2f}x; tokens match "
          f"{o['tokens_match_resident']}")


if __name__ == "__main__":
    main()
