"""How often long prompts preempt, and what swapping saves: the engine's real
scheduler and block manager (no model) replayed over workload shapes, with
each step priced by a cost model taken from the H200 run of
``memory_tiers_gpu.py`` (Llama-3-8B, bf16):

    PYTHONPATH=. python3 benchmarks/swap_preemption_model.py --out DIR [--shapes 4x4096+4096,...] [--pools 1040,...]

A step costs ``DECODE_MS`` (a graph-replayed decode step) plus ``PREFILL_US``
per prompt or recomputed token (a 4,096-token prefix: 108 ms computed less 41
ms for the same request with it cached) plus, with the host tier, every block
copied either way at ``COPY_GBPS`` (not overlapped: this favours recompute).
Each shape runs in a pool of half its KV demand and in a tighter one (as
many whole prompts as that holds, plus 12 blocks to grow into: the GPU run's
1,040 blocks), with the host tier (swaps, spills, restores) and without
(recompute only), the prefix cache on and off; ``$DIR/swap-preemption-model.json``
(``--name``). ``--shapes`` replaces the shapes (``N x PROMPT + OUTPUT``), ``--pools`` the two pools,
``--gap-ms`` makes the requests arrive over time (a server's load) instead of all at once.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random

from pagellm.engine.block_manager import BlockManager
from pagellm.engine.host_blocks import HostBlockPool, HostCopies
from pagellm.engine.scheduler import Scheduler, SchedulerConfig
from pagellm.engine.sequence import Sequence
from pagellm.sampling_params import SamplingParams

BLOCK, BLOCK_BYTES = 16, 2 << 20            # Llama-3-8B bf16: 128 KiB a token
DECODE_MS, PREFILL_US, COPY_GBPS = 5.5, 16.4, 46.0
SHAPES = [(n, prompt, out) for n, prompt, out in
          [(8, 4096, 256), (8, 4096, 512), (8, 4096, 1024), (16, 4096, 128), (16, 4096, 256), (16, 4096, 512),
           (16, 4096, 1024), (32, 4096, 256), (32, 4096, 512), (16, 6144, 512), (12, 4096, 1024), (8, 6144, 1024)]]


def replay(n: int, prompt: int, out: int, pool: int, host_tier: bool, prefix_caching: bool,
           gap_ms: float = 0.0) -> dict:
    """``gap_ms``: request ``i`` arrives at ``i x gap_ms`` on the model's clock (0: all at once)."""
    rng = random.Random(0)
    host = HostBlockPool(8 * pool) if host_tier else None
    scheduler = Scheduler(SchedulerConfig(256, 8192, prompt + out, 512),
                          BlockManager(pool, BLOCK, prefix_caching, host=host))
    arrivals = [Sequence(i, str(i), 0, [rng.randrange(1000, 100000) for _ in range(prompt)],
                         SamplingParams(max_tokens=out, ignore_eos=True), 0, 0.0) for i in range(n)]
    ms, copied = 0.0, 0
    while arrivals or scheduler.waiting or scheduler.running:
        while arrivals and arrivals[0].seq_id * gap_ms <= ms:
            scheduler.add(arrivals.pop(0))
        if not scheduler.waiting and not scheduler.running:   # idle until the next arrival
            ms = arrivals[0].seq_id * gap_ms
            continue
        batch = scheduler.schedule()
        copies = host.take_swaps() if host else HostCopies.none()
        waited = len(copies.out) + len(copies.in_)   # the write-backs run beside the step
        copied += waited + len(copies.write_back)
        computed = sum(k for k in batch.num_new_tokens if k > 1)
        ms += DECODE_MS + computed * PREFILL_US / 1e3 + waited * BLOCK_BYTES / COPY_GBPS / 1e6
        for seq, k in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += k
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(1000, 100000))
                if seq.num_output_tokens >= out:
                    scheduler.finish(seq)
    return {"seconds": ms / 1e3, "preemptions": scheduler.stats.num_preemptions,
            "computed_prompt_tokens": scheduler.stats.num_prefill_tokens, "blocks_copied": copied}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", help="e.g. 4x4096+4096,8x4096+4096")
    parser.add_argument("--pools", help="pool sizes in blocks, e.g. 1040 (default: half the demand, and tight)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="requests arrive this far apart (0: all at once)")
    parser.add_argument("--name", default="swap-preemption-model")
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(map(int, shape.replace("x", "+").split("+")))
                                                 for shape in args.shapes.split(",")]
    rows = []
    for (n, prompt, out), prefix_caching in itertools.product(shapes, (True, False)):
        half = n * (prompt + out) // BLOCK // 2
        tight = half // (prompt // BLOCK + 1) * (prompt // BLOCK + 1) + 12   # prompts + 12 blocks to grow into
        for pool in (half, tight) if args.pools is None else map(int, args.pools.split(",")):
            swap = replay(n, prompt, out, pool, True, prefix_caching, args.gap_ms)
            recompute = replay(n, prompt, out, pool, False, prefix_caching, args.gap_ms)
            rows.append({"requests": n, "prompt": prompt, "output": out, "pool_blocks": pool, "half_demand": half,
                         "prefix_caching": prefix_caching, "swap": swap, "recompute": recompute,
                         "speedup": recompute["seconds"] / swap["seconds"]})
            print(f"{n:3d} x ({prompt} + {out:4d}) in {pool:5d} blocks, prefix cache {prefix_caching!s:5}: "
                  f"preemptions {swap['preemptions']} / {recompute['preemptions']}, "
                  f"{swap['seconds']:.2f} s vs {recompute['seconds']:.2f} s = {rows[-1]['speedup']:.2f}x", flush=True)
    model = {"decode_ms": DECODE_MS, "prefill_us_per_token": PREFILL_US, "copy_gb_s": COPY_GBPS,
             "arrival_gap_ms": args.gap_ms}
    command = " ".join(["PYTHONPATH=. python3 benchmarks/swap_preemption_model.py --out DIR"]
                       + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
                          and v not in (None, 0.0, "swap-preemption-model")])
    with open(f"{args.out}/{args.name}.json", "w") as f:
        json.dump({"command": command,
                   "cost_model": model, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
