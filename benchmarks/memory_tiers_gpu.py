"""Memory tiers on one GPU, random weights, one process:

    PYTHONPATH=. python3 benchmarks/memory_tiers_gpu.py --out $OUT [--sections a,b] [--name NAME]

1. identity: a small model (qwen2.5-0.5b shapes) under forced swaps (12
   prompts of 300-700 tokens + 64 in a pool of 120 blocks, 256 tokens a step,
   ``swap_min_tokens`` 1, the host pool in 6 or 12 layer groups) and host prefix hits gives the greedy tokens of the same
   model unpressured: fp32 with the torch attention (eager; the Triton
   kernels take fp16/bf16) and bf16 with Triton and CUDA graphs (random bf16
   weights give near-flat logits, so a different batch shape may flip a tie).
2. copies (Llama-3-8B shapes, bf16 from here on): host<->device bandwidth of
   ``KVCache.swap`` (512 blocks each way, the swap-in also on one lane, and
   256 each way at once) and of one pinned copy.
3. swap vs recompute: 4 prompts of 4,096 tokens + 4,096 generated, greedy, in a
   pool of 1,040 blocks (all 4 prompts fit, then their growth to 2,048 blocks,
   twice the pool, preempts); the same engine with its host tier (swaps and
   spills) and without it (recompute only), on different prompts (no
   cross-variant cache hits); wall time, preemptions, swaps, recomputed tokens.
4. host prefix tier: a 4,096-token prefix + 16 tokens computed, asked again
   (device hit), evicted by other prompts (each prompt's blocks were written
   back to the host when it finished: write-back ahead), asked again
   (restored from the host: its blocks come in; the last prompt's
   write-backs go out after its token; its token and top-5 log-probs must
   equal the device hit's bit for bit); five rounds, medians of the time
   until ``generate`` returns (the device drained before each call) and of
   the time until the write-backs it left running are done too. Each round
   runs every ``RESTORE_VARIANTS`` entry, interleaved: the engine, and with
   the swap-ins on one lane and/or the graph replay waiting for all copies
   first (the earlier engine), so the gains are measured in the same run.
5. weight offload: Llama-3-8B under ``gpu_memory="8GiB"`` with
   ``cpu_offload_memory="auto"``: its batch-1 decode step against the
   bound (streamed bytes / pinned copy bandwidth + the all-resident eager step
   measured in 2.-4.'s engine), its peak device memory, and whether its greedy
   tokens are the resident engine's: with its CUDA graphs (over the resident
   layers, the streamed ones eager) those of the resident engine's graphs, with
   its graphs off those of the resident engine run eagerly (the same kernels
   and weights each); its step with graphs off, same run.
6. weight offload at scale: Llama-3-70B shapes (141 GB in bf16) under
   ``gpu_memory="80GiB"`` with ``cpu_offload_memory="auto"``, built layer by
   layer in place (``model.builder``): the host memory it took (peak RSS), its
   batch-1 eager decode step against the bound (streamed bytes / a pinned
   1 GiB copy's bandwidth + the on-device floor: the same step with the
   copies switched off, every offloaded layer computing from the buffer it
   finds). Run it in a process of its own (``--sections offload_70b``): its peak
   RSS is then its own, and running out of host memory loses no other figure.
7. multi-turn (an engine of its own, ``--pool-blocks``, ``--swap-space``):
   ``--conversations`` over their own 4,096-token documents, every
   conversation asking again each turn (a 32-token question, ``--answer``
   tokens answered, ignore eos) after all others had their turn: together
   their contexts need about twice the device pool, so each turn finds its
   earlier K/V evicted. With the host tier it comes back from host memory;
   recompute only (no host tier) computes it again. Different documents per
   variant (no cross-variant hits); wall time, computed and restored tokens.
``$OUT/NAME.json`` (``memory-tiers``) is rewritten after every part; a table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import resource
import statistics
import time
from contextlib import contextmanager

import torch
import triton

from pagellm import LLM, SamplingParams
from pagellm.engine import kv_cache

MODEL = "llama-3-8b"
ONE = SamplingParams(temperature=0, max_tokens=1)
GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def random_prompts(rng: random.Random, n: int, length: int) -> list[list[int]]:
    return [[rng.randrange(1000, 100000) for _ in range(length)] for _ in range(n)]


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def identity(dtype: str, backend: str) -> dict:
    rng = random.Random(3)
    prompts = [random_prompts(rng, 1, rng.randrange(300, 700))[0] for _ in range(12)]
    prefix = random_prompts(rng, 1, 512)[0]
    shared = [prefix + suffix for suffix in random_prompts(rng, 2, 8)]
    fillers = random_prompts(rng, 4, 700)
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    common = dict(random_weights=True, dtype=dtype, attention_backend=backend, max_model_len=2048, max_num_seqs=16,
                  max_num_batched_tokens=256)
    plain = LLM("qwen2.5-0.5b", num_kv_blocks=2048, **common)   # the shared prompts one call each, as below
    expected = tokens(plain, prompts, greedy), tokens(plain, shared[:1], greedy) + tokens(plain, shared[1:], greedy)
    del plain
    gc.collect()
    torch.cuda.empty_cache()
    kv_cache.GROUP_COPY_BYTES = 32 << 10   # the blocks (192 KiB in bf16, 384 in fp32) in 6 or 12 layer groups
    llm = LLM("qwen2.5-0.5b", num_kv_blocks=120, swap_space="1GiB", swap_min_tokens=1, **common)
    kv_cache.GROUP_COPY_BYTES = 512 << 10
    swapped = tokens(llm, prompts, greedy)
    swaps = llm.engine.stats()
    first = tokens(llm, shared[:1], greedy)
    tokens(llm, fillers, ONE)   # evicts the shared prefix from the device
    before = llm.engine.stats()
    second = tokens(llm, shared[1:], greedy)
    after = llm.engine.stats()
    result = {"dtype": dtype, "attention_backend": backend, "cuda_graphs": llm.engine.runner.graphs is not None,
              "layer_groups": len(llm.engine.runner.kv_cache.layer_groups),
              "swap_outputs_identical": f"{sum(a == b for a, b in zip(swapped, expected[0]))}/{len(prompts)}",
              "num_preemptions": swaps["num_preemptions"], "num_swapped_out": swaps["num_swapped_out"],
              "host_hit_outputs_identical": first + second == expected[1],
              "host_prefix_hit_tokens": after["host_prefix_hit_tokens"] - before["host_prefix_hit_tokens"]}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def copies(llm: LLM) -> dict:
    """On a fresh engine (no block holds anything yet)."""
    kv = llm.engine.runner.kv_cache
    n = min(512, kv.num_host_blocks // 2, kv.num_blocks)
    pairs = [(i, i) for i in range(n)]
    nbytes = n * kv.spec.bytes_per_block
    kv.swap(pairs, pairs)   # warm-up
    out_s = min(timed(lambda: kv.swap(pairs, [])) for _ in range(3))
    in_s = min(timed(lambda: kv.swap([], pairs)) for _ in range(3))
    with restore_variant(llm, lanes=1, graph_waits_all=False):
        in_one_lane_s = min(timed(lambda: kv.swap([], pairs)) for _ in range(3))
    half = [(i, n + i) for i in range(n // 2)], [(n // 2 + i, i) for i in range(n // 2)]
    both_s = min(timed(lambda: kv.swap(*half)) for _ in range(3))
    return {"blocks": n, "bytes": nbytes, "layer_groups": len(kv.layer_groups),
            "swap_out_gb_s": nbytes / out_s / 1e9, "swap_in_gb_s": nbytes / in_s / 1e9,
            "swap_in_one_lane_gb_s": nbytes / in_one_lane_s / 1e9,
            "half_each_way_at_once_gb_s": nbytes / both_s / 1e9, "half_each_way_ms": both_s * 1e3,
            "pinned_h2d_gb_s": pinned_h2d_gb_s(nbytes)}


@contextmanager
def restore_variant(llm: LLM, lanes: int, graph_waits_all: bool):
    """The engine as it was before the overlap, in part: swap-ins on ``lanes`` of the
    KV cache's host -> device streams; ``graph_waits_all``: a graph replay first waits
    for every copy of its step (instead of each layer group's, inside the graph)."""
    runner = llm.engine.runner
    kv, graphs = runner.kv_cache, runner.graphs
    streams = kv._streams
    kv._streams = (streams[0], streams[1][:lanes])
    if graph_waits_all:
        replay = graphs.run
        graphs.run = lambda *args: (kv_cache.wait_for_swaps(kv.layer_ready), replay(*args))[1]
    try:
        yield
    finally:
        kv._streams = streams
        graphs.__dict__.pop("run", None)


def swap_vs_recompute(llm: LLM, n: int = 4, prompt: int = 4096, out: int = 4096) -> dict:
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
    engine = llm.engine
    host = engine.block_manager.host
    llm.generate(random_prompts(rng, 2, prompt), SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    result = {}
    for name in ("swap", "recompute"):
        engine.block_manager.host = host if name == "swap" else None   # recompute only: no host tier at all
        prompts = random_prompts(rng, n, prompt)
        before = engine.stats()
        seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
        after = engine.stats()
        result[name] = {"seconds": seconds, **{k: after[k] - before[k] for k in (
            "num_preemptions", "num_swapped_out", "kv_bytes_to_host", "kv_bytes_to_device", "num_prefill_tokens")}}
    engine.block_manager.host = host
    return result | {"speedup": result["recompute"]["seconds"] / result["swap"]["seconds"],
                     "workload": f"{n} x ({prompt} + {out})", "kv_pool_blocks": engine.block_manager.num_blocks,
                     "kv_demand_blocks": n * (prompt + out) // 16}


def converse(llm: LLM, documents: list[list[int]], turns: int, question: int, answer: int,
             rng: random.Random) -> list[list[int]]:
    """Each turn every conversation appends a question and the model's greedy answer; all answers."""
    params = SamplingParams(temperature=0, max_tokens=answer, ignore_eos=True)
    contexts = [list(document) for document in documents]
    answers = []
    for _ in range(turns):
        for context in contexts:
            context.extend(random_prompts(rng, 1, question)[0])
        answers.extend(tokens(llm, contexts, params))
        for context, reply in zip(contexts, answers[-len(contexts):]):
            context.extend(reply)
    return answers


def multiturn(answers: tuple[int, ...], n: int, pool_blocks: int, swap_space: str, document: int = 4096,
              turns: int = 4, question: int = 32) -> dict:
    """An engine of its own, its pool sized so that the ``n`` conversations need about twice it."""
    llm = LLM(MODEL, random_weights=True, dtype="bfloat16", max_model_len=8192, num_kv_blocks=pool_blocks,
              swap_space=swap_space)
    engine = llm.engine
    host = engine.block_manager.host
    rng = random.Random(2)
    converse(llm, random_prompts(rng, 2, document), 1, question, 2, rng)   # warm-up
    result = {"kv_pool_blocks": pool_blocks, "swap_space": swap_space}
    for answer in answers:
        row = {"workload": f"{n} conversations x {turns} turns: {document}-token document, then {question} + {answer}"
                           " tokens a turn", "kv_demand_blocks": n * (document + turns * (question + answer)) // 16}
        for name in ("host_tier", "recompute"):
            engine.block_manager.host = host if name == "host_tier" else None
            documents = random_prompts(rng, n, document)
            before = engine.stats()
            seconds = timed(lambda: converse(llm, documents, turns, question, answer, rng))
            after = engine.stats()
            row[name] = {"seconds": seconds, **{k: after[k] - before[k] for k in (
                "num_prefill_tokens", "host_prefix_hit_tokens", "num_preemptions", "kv_bytes_to_host",
                "kv_bytes_to_device")}}
        row["speedup"] = row["recompute"]["seconds"] / row["host_tier"]["seconds"]
        result[f"answer_{answer}"] = row
    engine.block_manager.host = host
    del llm, engine, host
    gc.collect()
    torch.cuda.empty_cache()
    return result


RESTORE_VARIANTS = {"overlap": (2, False),                 # the engine: 2 lanes, the graph waits per layer group
                    "lanes_replay_waits_all": (2, True),  # 2 lanes, the replay waits for all copies first
                    "one_lane": (1, False),               # one lane, the graph waits per layer group
                    "before": (1, True)}                  # one lane, the replay waits for all (the earlier engine)
TOP_LOGPROBS = SamplingParams(temperature=0, max_tokens=1, logprobs=5)


def prefix_restore(llm: LLM, num_rounds: int = 5) -> dict:
    """Per round and variant (interleaved, so drift hits all alike): a new 4,096-token prefix
    + a 16-token tail computed, asked again (device hit), evicted, asked again (restored);
    the device hit and the restore ask the same prompt, so their token and top log-probs
    must be equal bit for bit (the same kernels on the same K/V)."""
    rng = random.Random(1)
    engine = llm.engine

    def run(prompt: list[int]) -> tuple[float, float, list]:
        """Seconds until generate returns its token, and until the copies it left running beside (the
        write-backs of blocks it freed, which a server's next steps overlap) are done as well; its top log-probs."""
        torch.cuda.synchronize()   # the previous call's write-backs drain before the clock starts
        start = time.perf_counter()
        out = llm.generate([prompt], TOP_LOGPROBS, use_tqdm=False)[0].outputs[0]
        torch.cuda.current_stream().synchronize()
        to_tokens = time.perf_counter() - start
        torch.cuda.synchronize()
        return to_tokens, time.perf_counter() - start, [(out.token_ids, out.logprobs)]

    run(random_prompts(rng, 1, 4112)[0])   # warm: the same shapes
    rounds: dict[str, list[dict]] = {name: [] for name in RESTORE_VARIANTS}
    for _ in range(num_rounds):
        for name, (lanes, graph_waits_all) in RESTORE_VARIANTS.items():
            with restore_variant(llm, lanes, graph_waits_all):
                prefix, tail = random_prompts(rng, 1, 4096)[0], random_prompts(rng, 1, 16)[0]
                computed = run(prefix + tail)
                device_hit = run(prefix + tail)
                for prompt in random_prompts(rng, engine.block_manager.num_blocks // 256 + 2, 4096):
                    run(prompt)
                before = engine.stats()
                restored = run(prefix + tail)
                after = engine.stats()
            rounds[name].append({
                "computed_s": computed[0], "device_hit_s": device_hit[0], "restored_s": restored[0],
                "computed_drained_s": computed[1], "device_hit_drained_s": device_hit[1],
                "restored_drained_s": restored[1], "restored_identical_to_device_hit": restored[2] == device_hit[2],
                "restored_token_equals_computed": restored[2][0][0] == computed[2][0][0],
                **{k: after[k] - before[k] for k in ("host_prefix_hit_tokens", "num_prefill_tokens",
                                                     "kv_bytes_to_host", "kv_bytes_to_device")}})
    result = {}
    for name, variant_rounds in rounds.items():
        med = {k: statistics.median(r[k] for r in variant_rounds) for k in variant_rounds[0]
               if not isinstance(variant_rounds[0][k], bool)}
        result[name] = {"rounds": variant_rounds, **med, "speedup": med["computed_s"] / med["restored_s"],
                        "speedup_drained": med["computed_drained_s"] / med["restored_drained_s"],
                        "exposed_copy_ms": (med["restored_s"] - med["device_hit_s"]) * 1e3,
                        "identical": all(r["restored_identical_to_device_hit"] for r in variant_rounds)}
    return result | {"speedup": result["overlap"]["speedup"], "identical": result["overlap"]["identical"]}


def decode_ms(llm: LLM, prompt: list[int], n: int) -> float:
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)   # warm
    whole = timed(lambda: llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                       use_tqdm=False))
    first = timed(lambda: llm.generate([prompt], ONE, use_tqdm=False))   # prefill + 1 token
    return (whole - first) / (n - 1) * 1e3


def offload_8gib(resident_eager_ms: float, resident_tokens: list[int], resident_graph_tokens: list[int],
                 h2d_gb_s: float, prompt: list[int]) -> dict:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(MODEL, random_weights=True, dtype="bfloat16", max_model_len=4096, max_num_seqs=4,
              max_num_batched_tokens=2048, gpu_memory="8GiB", cpu_offload_memory="auto")
    start_s = time.perf_counter() - start
    memory = llm.engine.memory
    ms = decode_ms(llm, prompt, 16)
    runner = llm.engine.runner
    graphs, runner.graphs = runner.graphs, None
    graphs_off_ms = decode_ms(llm, prompt, 16)
    eager_tokens = tokens(llm, [prompt], GREEDY_32)[0]
    runner.graphs = graphs
    greedy = tokens(llm, [prompt], GREEDY_32)[0]
    bound_ms = resident_eager_ms + memory.host_weights_bytes / (h2d_gb_s * 1e9) * 1e3
    return {"start_s": start_s, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10,
            "graphs": len(graphs.shapes) if graphs else 0, "graphs_eager_from": graphs and graphs.eager_from,
            "greedy_tokens_equal_resident_graphs": greedy == resident_graph_tokens,
            "graphs_off_tokens_equal_resident_eager": eager_tokens == resident_tokens,
            "decode_ms_graphs_off": graphs_off_ms,
            "offloaded_layers": memory.offloaded_layers,
            "host_weights_bytes": memory.host_weights_bytes, "device_weights_bytes": memory.weights_bytes,
            "activation_bytes": memory.activation_bytes, "kv_cache_bytes": memory.kv_cache_bytes,
            "kv_blocks": memory.num_blocks, "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "decode_ms": ms, "bound_ms": bound_ms, "ratio_to_bound": ms / bound_ms,
            "streamed_gb_s": memory.host_weights_bytes / ((ms - resident_eager_ms) / 1e3) / 1e9}


def pinned_h2d_gb_s(nbytes: int = 1 << 30) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / min(timed(lambda: dev.copy_(host, non_blocking=True)) for _ in range(3)) / 1e9


def offload_70b(prompt: list[int]) -> dict:
    h2d_gb_s = pinned_h2d_gb_s()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    start = time.perf_counter()
    llm = LLM("llama-3-70b", random_weights=True, dtype="bfloat16", max_model_len=4096, max_num_seqs=4,
              max_num_batched_tokens=2048, gpu_memory="80GiB", cpu_offload_memory="auto")
    start_s = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    memory, offload = llm.engine.memory, llm.engine.runner.offload
    print(f"70b built in {start_s:.0f} s, {memory.offloaded_layers} layers streamed, peak RSS {peak_rss / 1e9:.1f} GB",
          flush=True)
    ms = decode_ms(llm, prompt, 6)
    offload._fetch = lambda index, slot: slot   # no copies: every offloaded layer computes from a buffer as it is
    floor_ms = decode_ms(llm, prompt, 8)
    del offload._fetch
    bound_ms = floor_ms + memory.host_weights_bytes / (h2d_gb_s * 1e9) * 1e3
    return {"start_s": start_s, "offloaded_layers": memory.offloaded_layers,
            "host_weights_bytes": memory.host_weights_bytes, "device_weights_bytes": memory.weights_bytes,
            "kv_cache_bytes": memory.kv_cache_bytes, "kv_blocks": memory.num_blocks,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(), "rss_before_bytes": rss_before,
            "peak_rss_bytes": peak_rss, "pinned_h2d_gb_s": h2d_gb_s, "decode_ms": ms, "floor_ms": floor_ms,
            "bound_ms": bound_ms, "ratio_to_bound": ms / bound_ms,
            "streamed_gb_s": memory.host_weights_bytes / ((ms - floor_ms) / 1e3) / 1e9}


SECTIONS = ("identity", "copies", "swap_vs_recompute", "prefix_restore", "multiturn", "offload_8gib", "offload_70b")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default=",".join(SECTIONS[:-1]),
                        help=f"of {','.join(SECTIONS)} (identity_torch or identity_triton: one of identity's two)")
    parser.add_argument("--name", default="memory-tiers")
    parser.add_argument("--answers", default="128", help="multiturn: answer lengths, one workload each")
    parser.add_argument("--conversations", type=int, default=48, help="multiturn: conversations")
    parser.add_argument("--pool-blocks", type=int, default=6144, help="multiturn: the device KV pool")
    parser.add_argument("--swap-space", default="32GiB", help="multiturn: the host pool")
    args = parser.parse_args()
    sections = args.sections.split(",")
    figures: dict = {}
    result = {"device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "python": platform.python_version()},
              "command": f"PYTHONPATH=. python3 benchmarks/memory_tiers_gpu.py --out $OUT --sections {args.sections}"
                         + (f" --answers {args.answers} --conversations {args.conversations} --pool-blocks {args.pool_blocks}"
                            f" --swap-space {args.swap_space}" if "multiturn" in sections else "")
                         + (f" --name {args.name}" if args.name != "memory-tiers" else ""),
              "date": datetime.date.today().isoformat(), "model": f"{MODEL} shapes, random bf16 weights",
              "figures": figures}

    def record(name: str, fn, *fn_args) -> None:
        started = time.perf_counter()
        try:
            figures[name] = fn(*fn_args)
        except Exception as error:   # keep the other parts' figures
            figures[name] = {"error": repr(error)}
        figures[name]["section_s"] = time.perf_counter() - started
        with open(f"{args.out}/{args.name}.json", "w") as f:
            json.dump(result, f, indent=2)
        print(name, json.dumps(figures[name]), flush=True)

    for short, dtype, backend in (("fp32", "float32", "torch"), ("bf16", "bfloat16", "triton")):
        if "identity" in sections or f"identity_{backend}" in sections:
            record(f"identity_{short}_{backend}", identity, dtype, backend)
    prompt = list(range(1000, 1128))
    if "multiturn" in sections:
        record("multiturn", multiturn, tuple(int(a) for a in args.answers.split(",")), args.conversations,
               args.pool_blocks, args.swap_space)
    if {"copies", "swap_vs_recompute", "prefix_restore", "offload_8gib"} & set(sections):
        llm = LLM(MODEL, random_weights=True, dtype="bfloat16", max_model_len=8192, num_kv_blocks=1040,
                  swap_space="8GiB", max_num_seqs=16)
        for name, fn in (("copies", copies), ("prefix_restore", prefix_restore),
                         ("swap_vs_recompute", swap_vs_recompute)):
            if name in sections:
                record(name, fn, llm)
        if "offload_8gib" in sections:
            graphs, llm.engine.runner.graphs = llm.engine.runner.graphs, None   # the eager step, as offloading runs
            record("resident", lambda: {"eager_decode_ms": decode_ms(llm, prompt, 32),
                                        "greedy_tokens": tokens(llm, [prompt], GREEDY_32)[0]})
            llm.engine.runner.graphs = graphs
            record("resident_graphs", lambda: {"decode_ms": decode_ms(llm, prompt, 32),
                                               "greedy_tokens": tokens(llm, [prompt], GREEDY_32)[0]})
            del graphs
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    if "offload_8gib" in sections:
        resident = figures["resident"]
        record("offload_8gib", offload_8gib, resident.get("eager_decode_ms", 0.0), resident.get("greedy_tokens"),
               figures["resident_graphs"].get("greedy_tokens"),
               figures.get("copies", {}).get("pinned_h2d_gb_s") or pinned_h2d_gb_s(), prompt)
    if "offload_70b" in sections:
        result["model"] = "llama-3-70b shapes, random bf16 weights"
        record("offload_70b", offload_70b, prompt)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
