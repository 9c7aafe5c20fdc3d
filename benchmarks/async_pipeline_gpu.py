"""The asynchronous step pipeline and the cap on prompt tokens beside decodes, on one GPU, in one process.

1. identity: random qwen2.5-0.5b, bf16, Triton attention + decode CUDA graphs:
   greedy and seeded outputs with the pipeline on == off (one engine, switched
   between runs), and the host syncs a pipelined decode step makes
   (``torch.cuda.set_sync_debug_mode``: every ``.item()``/``.tolist()``/
   blocking copy warns; the one event wait per step does not count);
2. the issue's three batched workloads (ignore eos) on random Llama-3-8B
   shapes, one engine: the second (256 requests, input 100-1024, output
   100-1024) with the pipeline on/off and with each cap on the prompt tokens a
   step takes beside running decodes (``max_prefill_tokens_with_decodes``), the
   first and third with the defaults: output tok/s, its ratio to the roofline
   prediction with measured peaks, ITL p50/p99, decode steps' fraction of the
   bandwidth floor. Every run draws its own prompts (a run repeating an
   earlier run's prompts would be served from the prefix cache), and the
   prompt tokens actually computed are recorded to show it;
3. batch-1 decode 128 -> 128, pipeline on/off: tok/s and fraction of the floor.

Usage: python benchmarks/async_pipeline_gpu.py OUT.json [--model llama-3-8b] [--caps 2048,8192,1024,512]
[--workloads 1,2,3] (``--small --model M --identity-model M`` with a tiny model: a CPU smoke run).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings

import torch

from pagellm import LLM, SamplingParams
from pagellm.bench.report import measured_hardware, roofline, roofline_hardware
from pagellm.bench.runner import decode_bandwidth_of, device_info, measure_peaks, random_prompts, run_requests
from pagellm.bench.stats import distribution_ms
from pagellm.engine.llm_engine import LLMEngine
from pagellm.config import EngineConfig


def identity(model: str, small: bool) -> dict:
    """Pipeline on == off: exactly for a greedy batch whose steps have the same shapes either way; for
    a mix with an n > 1 request (its samples fork one step later with the pipeline, so other steps
    run: bf16 rounding may then flip near-ties of random weights) a divergence is allowed only where
    the synchronous run's top two tokens are within TIE nats."""
    cuda = torch.cuda.is_available()
    llm = LLM(model, random_weights=True, dtype="bfloat16" if cuda else "float32", enable_prefix_caching=False,
              kv_cache_memory="2GiB", max_model_len=1024 if not small else 256, max_num_batched_tokens=512)
    rng = random.Random(0)
    lens = [1, 7, 33, 100, 250, 17, 600, 3] if not small else [5, 9, 30]
    prompts = [[rng.randrange(llm.engine.model_config.vocab_size) for _ in range(n)] for n in lens]
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    mixed = [greedy] * (len(lens) - 1) + [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, n=3, max_tokens=40, ignore_eos=True)]
    report = {"backend": llm.engine.runner.backend.name, "cuda_graphs": llm.engine.runner.graphs is not None}
    for name, params in (("greedy", [greedy] * len(lens)), ("mixed_n3", mixed)):
        outs = {}
        for overlap in (False, True):
            llm.engine.overlap = overlap
            outs[overlap] = [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]
        report[name] = compare(outs[False], outs[True])
    report["sync_warnings_per_decode_step"] = count_syncs(llm.engine) if cuda else None
    exact, tie_only = report["greedy"]["exact"], report["mixed_n3"]["max_gap_at_divergence"] <= TIE
    report["verdict"] = "PASS" if exact and tie_only else "FAIL"
    return report


TIE = 0.05


def compare(ref: list, got: list) -> dict:
    """Requests identical, and at each divergence of a logprobs-reporting one, the reference's gap."""
    same, gaps = 0, []
    for ref_samples, got_samples in zip(ref, got):
        for r, g in zip(ref_samples, got_samples):
            if r.token_ids == g.token_ids:
                same += 1
                continue
            i = next(j for j, (a, b) in enumerate(zip(r.token_ids, g.token_ids)) if a != b)
            entry = r.logprobs[i] if r.logprobs else {}
            a, b = entry.get(r.token_ids[i]), entry.get(g.token_ids[i])
            gaps.append(abs(a.logprob - b.logprob) if a is not None and b is not None else float("inf"))
    total = sum(len(samples) for samples in ref)
    return {"identical": same, "sequences": total, "exact": same == total, "gaps_at_divergence": gaps,
            "max_gap_at_divergence": max(gaps, default=0.0)}


def count_syncs(engine: LLMEngine, steps: int = 20) -> float:
    """Host syncs torch reports per pipelined decode step (16 sequences)."""
    engine.overlap = True
    for i in range(16):
        engine.add_request(f"sync-{i}", [1 + i] * 64, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(5):
        engine.step()
    torch.cuda.set_sync_debug_mode(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            engine.step()
    torch.cuda.set_sync_debug_mode(0)
    for i in range(16):
        engine.abort_request(f"sync-{i}")
    engine.step()
    for w in caught[:3]:
        print("sync:", w.message)
    return len(caught) / steps


WORKLOADS = {1: (256, (32, 512), (256, 256)), 2: (256, (100, 1024), (100, 1024)),
             3: (2048, (256, 2048), (64, 512))}   # requests, input range, output range
SMALL_WORKLOAD = (8, (10, 60), (10, 60))


def workload(engine: LLMEngine, peaks: dict, shape: tuple, overlap: bool, cap: int, seed: int) -> dict:
    n, inputs, outputs = shape
    rng = random.Random(seed)
    in_lens = [rng.randint(*inputs) for _ in range(n)]
    out_lens = [rng.randint(*outputs) for _ in range(n)]
    prompts = random_prompts(rng, engine.model_config.vocab_size, in_lens)
    engine.overlap = overlap
    engine.scheduler.config.max_prefill_tokens_with_decodes = cap
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]
    computed_before = engine.scheduler.stats.num_prefill_tokens
    run = run_requests(engine, prompts, params, f"w{seed}", record_kv=False)
    duration = run.duration()
    n_out = sum(run.num_output.values())
    result = {"requests": n, "inputs": inputs, "outputs": outputs, "seed": seed, "overlap": overlap,
              "max_prefill_tokens_with_decodes": cap, "duration_s": duration,
              "prompt_tokens": sum(in_lens),
              "prompt_tokens_computed": engine.scheduler.stats.num_prefill_tokens - computed_before,
              "output_tokens_per_s": n_out / duration, "total_tokens_per_s": (n_out + sum(in_lens)) / duration,
              "itl_ms": distribution_ms(run.itls()), "ttft_ms": distribution_ms(run.ttfts()),
              "decode_fraction_of_floor": decode_bandwidth_of(engine, run.steps, peaks)["fraction_of_floor"],
              "steps": len(run.steps)}
    hw = roofline_hardware(argparse.Namespace(hardware=None, bandwidth=None, flops=None),
                           device_info(engine.runner.device))
    measured = measured_hardware(hw, peaks)
    if measured is not None:
        batch = min(n, engine.config.max_num_seqs)
        r = roofline(engine, [measured], batch, round(statistics.fmean(in_lens)),
                     max(1, round(statistics.fmean(out_lens))))[0]
        predicted = r.pop("report").e2e.tokens_per_s
        result["roofline_output_tokens_per_s"] = predicted
        result["fraction_of_roofline"] = result["output_tokens_per_s"] / predicted
    itl = result["itl_ms"]
    result["itl_p99_over_p50"] = itl["p99"] / itl["p50"] if itl.get("p50") else None
    print(json.dumps({k: v for k, v in result.items() if k not in ("itl_ms", "ttft_ms")}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--identity-model", default="qwen2.5-0.5b")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--caps", default="2048,8192,1024,512",
                        help="prompt-token caps beside decodes for workload 2 (the first is used for 1 and 3)")
    parser.add_argument("--workloads", default="2,1,3")
    parser.add_argument("--no-off", action="store_true", help="no pipeline-off variant")
    parser.add_argument("--budget", type=float, default=300.0)
    args = parser.parse_args()
    start = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "torch": torch.__version__}
    if torch.cuda.is_available():
        import triton
        report |= {"device": torch.cuda.get_device_name(), "triton": triton.__version__}

    def save() -> None:
        json.dump(report, open(args.out, "w"), indent=2)

    report["identity"] = identity(args.identity_model, args.small)
    print("identity:", report["identity"], flush=True)
    save()
    small = args.small
    engine = LLMEngine(EngineConfig(args.model, random_weights=True, dtype="bfloat16" if not small else "float32",
                                    kv_cache_memory="60GiB" if not small else "256MiB",
                                    max_model_len=4096 if not small else 256))
    device = engine.runner.device
    peaks = measure_peaks(device, engine.runner.dtype, matmul=device.type == "cuda")
    report["peaks"] = peaks
    caps = [int(c) for c in args.caps.split(",")]
    runs = []   # (workload, pipeline on, cap)
    for w in (int(x) for x in args.workloads.split(",")):
        runs += [(w, True, cap) for cap in (caps if w == 2 else caps[:1])]
        if w == 2 and not args.no_off:
            runs.insert(1, (2, False, caps[0]))
    shape_of = (lambda w: SMALL_WORKLOAD) if small else WORKLOADS.get
    n, inputs, _ = shape_of(2)
    workload(engine, peaks, (n, inputs, (8, 16)), True, caps[0], seed=1)   # warm-up: builds the kernels
    report["workloads"] = []
    for seed, (w, overlap, cap) in enumerate(runs, start=2):
        if time.perf_counter() - start > args.budget:
            report["workloads"].append({"workload": w, "skipped": [overlap, cap]})
            continue
        report["workloads"].append({"workload": w} | workload(engine, peaks, shape_of(w), overlap, cap, seed))
        save()
    report["bs1"] = []
    for overlap in (True, False):
        r = workload(engine, peaks, (1, (128, 128), (128, 128)) if not small else (1, (20, 20), (20, 20)),
                     overlap, caps[0], seed=100 + overlap)
        report["bs1"].append({"overlap": overlap, "decode_tokens_per_s": 1e3 / r["itl_ms"]["mean"],
                              "decode_fraction_of_floor": r["decode_fraction_of_floor"]})
    report["seconds"] = time.perf_counter() - start
    save()
    print(f"{'variant':34} {'out tok/s':>10} {'of roofline':>11} {'ITL p50':>8} {'ITL p99':>8} {'p99/p50':>8} "
          f"{'decode/floor':>12}")
    for r in report["workloads"]:
        if "skipped" in r:
            continue
        name = f"w{r['workload']} pipeline {'on' if r['overlap'] else 'off'}, cap {r['max_prefill_tokens_with_decodes']}"
        print(f"{name:34} {r['output_tokens_per_s']:10.0f} {r.get('fraction_of_roofline', 0):11.1%} "
              f"{r['itl_ms']['p50']:8.1f} {r['itl_ms']['p99']:8.1f} {r['itl_p99_over_p50']:8.2f} "
              f"{r['decode_fraction_of_floor']:12.1%}")
    for r in report["bs1"]:
        print(f"bs1 pipeline {'on' if r['overlap'] else 'off'}: {r['decode_tokens_per_s']:.1f} tok/s, "
              f"{r['decode_fraction_of_floor']:.1%} of floor")


if __name__ == "__main__":
    main()
