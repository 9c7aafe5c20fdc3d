"""`pagellm bench throughput | latency | prefill`: offline benchmarks of the engine, in process.

* ``throughput``: N requests of random token ids, input and output lengths
  fixed (``--input-len 128``) or drawn uniformly (``--input-len 32-512``), all
  submitted at once; requests/s, output and total tokens/s, TTFT / ITL / E2E.
* ``latency``: a batch (default 1) of fixed-length requests, repeated; TTFT,
  time per output token, end to end.
* ``prefill``: one step computing ``B`` prompts of ``L`` tokens (max_tokens=1),
  achieved FLOP/s against a bf16 matmul timed in the same process.

Every bench reports peak device memory, KV pool usage and waste at the end of
every step, and for decode-only steps the fraction of the memory-bandwidth
floor achieved (weights + K/V bytes read over the copy bandwidth measured in
the same process; see ``stats``). Timestamps are ``time.perf_counter`` taken
as outputs come back from ``engine.step()``; the bench's own bookkeeping
between steps runs off the clock when the step ended synchronised (the
sampler's ``.tolist()``), since the device is idle then. ``--compare hf`` runs
transformers on the same shapes and requests (``hf_baseline``) after the
engine is freed; ``--random-model NAME`` (a preset, or an HF folder whose
config is used) needs no checkpoint; ``--seed`` (the engine's) seeds the
random weights and the prompts. The roofline prediction of
``pagellm.analysis`` is printed beside the measurement (``--hardware``, or the
preset matching the CUDA device; ``--bandwidth``/``--flops`` on other
devices). ``--json PATH`` writes everything.
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics

import torch

from pagellm.bench.report import (TARGETS, bits_of, check, fmt, gib, header, measured_hardware, pct, print_tables,
                                  roofline, roofline_hardware, write_json)
from pagellm.bench.runner import (Run, decode_bandwidth_of, delta, device_info, engine_summary,
                                  free_device_memory, measure_peaks, peak_memory, random_prompts, reset_peak_memory,
                                  run_requests, runner_info, scheduler_stats, speculation_rows)
from pagellm.bench.stats import distribution_ms, prefill_flops, summarize_kv
from pagellm.config import EngineConfig, add_engine_arguments
from pagellm.engine.llm_engine import LLMEngine
from pagellm.utils.math import cdiv

logger = logging.getLogger("pagellm")


# ---------------------------------------------------------------- arguments

def _length(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32-512' or '32:512' -> (32, 512), inclusive."""
    for sep in ("-", ":"):
        if sep in text.strip().lstrip("-"):
            lo, hi = text.split(sep, 1)
            lo, hi = int(lo), int(hi)
            break
    else:
        lo = hi = int(text)
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"length must be N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, default_model="")
    parser.add_argument("--random-model", metavar="NAME",
                        help="random weights of a preset's shape (e.g. llama-3-8b) or of an HF folder's config")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    parser.add_argument("--compare", choices=["hf"], help="also run HF transformers on the same requests")
    parser.add_argument("--hardware", help="roofline hardware preset (default: matched from the CUDA device name)")
    parser.add_argument("--bandwidth", help="roofline memory bandwidth, e.g. 3.35TB/s (overrides the preset)")
    parser.add_argument("--flops", help="roofline matmul peak, e.g. 989TFLOP/s (overrides the preset)")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    tp = bench_subparsers.add_parser("throughput", help="offline throughput: N requests submitted at once")
    _add_common(tp)
    tp.add_argument("--num-prompts", type=int, default=256)
    tp.add_argument("--input-len", type=_length, default=(128, 128), help="N or LO-HI (uniform, inclusive)")
    tp.add_argument("--output-len", type=_length, default=(128, 128), help="N or LO-HI (uniform, inclusive)")
    tp.add_argument("--ignore-eos", action="store_true", help="every request generates exactly its output length")
    tp.add_argument("--warmup-requests", type=int, default=4)
    tp.set_defaults(func=run_throughput)

    lat = bench_subparsers.add_parser("latency", help="time per output token and TTFT at a small batch")
    _add_common(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--warmup-iters", type=int, default=1)
    lat.add_argument("--hf-iters", type=int, default=1, help="timed HF generate runs with --compare hf")
    lat.set_defaults(func=run_latency, max_num_seqs=None)

    pre = bench_subparsers.add_parser("prefill", help="one prefill step of B x L tokens: achieved FLOP/s")
    _add_common(pre)
    pre.add_argument("--batch-size", type=int, default=8)
    pre.add_argument("--input-len", type=int, default=2048)
    pre.add_argument("--num-iters", type=int, default=5)
    pre.add_argument("--warmup-iters", type=int, default=1)
    pre.set_defaults(func=run_prefill, max_num_seqs=None)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


# ---------------------------------------------------------------- engine

def _engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.random_model and args.model:
        raise ValueError("give MODEL or --random-model, not both")
    if args.random_model:
        args.model, args.random_weights = args.random_model, True
    if not args.model:
        raise ValueError("name a model: MODEL (checkpoint) or --random-model NAME")
    return EngineConfig.from_args(args)


# ---------------------------------------------------------------- throughput

def run_throughput(args: argparse.Namespace) -> int:
    from pagellm.sampling_params import SamplingParams
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _positive(args, "num_prompts")
    config = _engine_config(args)
    device, dtype = config.torch_device, config.torch_dtype
    dev = device_info(device)
    peaks = measure_peaks(device, dtype, matmul=device.type == "cuda")
    rng = random.Random(config.seed)
    (in_lo, in_hi), (out_lo, out_hi) = args.input_len, args.output_len
    input_lens = [rng.randint(in_lo, in_hi) for _ in range(args.num_prompts)]
    output_lens = [rng.randint(out_lo, out_hi) for _ in range(args.num_prompts)]

    result = _throughput_engine_phase(args, config, device, peaks, rng, input_lens, output_lens, SamplingParams)
    prompts = result.pop("_prompts")
    free_device_memory(result)

    hf = None
    if args.compare == "hf":
        from pagellm.bench.hf_baseline import run_hf
        if out_lo != out_hi:
            hf = {"error": "--compare hf needs a fixed --output-len (generate_batch takes one max_new_tokens)"}
        else:
            logger.info(f"bench: HF generate_batch on {len(prompts)} requests")
            hf = run_hf("throughput", config.model, dtype, device, prompts, out_lo)
        ours = result["results"]["output_tokens_per_s"]
        theirs = hf.get("output_tokens_per_s")
        hf["speedup_output_tokens_per_s"] = ours / theirs if theirs else None
        result["hf"] = hf
        result["checks"]["throughput_vs_hf_generate_batch"] = check(
            hf["speedup_output_tokens_per_s"], TARGETS["throughput_vs_hf_generate_batch"])

    payload = header(args, "throughput", dev, config) | result
    res, kv = result["results"], result["kv"]
    rows = [("device", dev["name"]), ("model", result["model"]["name"] or config.model),
            ("requests", f"{res['num_requests']} (input {in_lo}-{in_hi}, output {out_lo}-{out_hi})"),
            ("duration", fmt(res["duration_s"], " s", 3)),
            ("requests/s", fmt(res["requests_per_s"])),
            ("output tokens/s", fmt(res["output_tokens_per_s"], digits=1)),
            ("total tokens/s", fmt(res["total_tokens_per_s"], digits=1)),
            ("prompt / output tokens", f"{res['total_prompt_tokens']:,} / {res['total_output_tokens']:,}"),
            ("peak memory (allocated)", gib(result["memory"]["peak_allocated_bytes"])),
            ("KV usage max / mean", f"{kv['usage_max']:.1%} / {kv['usage_mean']:.1%}"),
            ("KV waste max / mean (per step)", f"{kv['waste_max']:.2%} / {kv['waste_mean']:.2%}"),
            ("decode steps: bandwidth floor reached", pct(result["decode_bandwidth"]["fraction_of_floor"])),
            ("preemptions", str(result["scheduler"]["num_preemptions"]))] + speculation_rows(result["scheduler"])
    if hf is not None:
        rows += [("HF generate_batch output tokens/s", fmt(hf.get("output_tokens_per_s"), digits=1)),
                 ("speed-up vs HF generate_batch", fmt(hf.get("speedup_output_tokens_per_s"), "x")),
                 ("HF error", hf.get("error") or "-")]
    print_tables("pagellm bench throughput", rows, {k: result["latency_ms"][k] for k in ("ttft", "itl", "e2e")},
                 result["roofline"])
    write_json(args.json, payload)
    return 0


def _throughput_engine_phase(args, config, device, peaks, rng, input_lens, output_lens, SamplingParams) -> dict:
    engine = LLMEngine(config)
    vocab = engine.model_config.vocab_size
    longest = max(i + o for i, o in zip(input_lens, output_lens))
    if longest > engine.max_model_len:
        raise ValueError(f"input + output length reaches {longest}, over max_model_len {engine.max_model_len}")
    prompts = random_prompts(rng, vocab, input_lens)
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=args.ignore_eos) for o in output_lens]

    warm = min(args.warmup_requests, args.num_prompts)
    if warm:
        warm_lens = [max(input_lens)] + [min(input_lens)] * (warm - 1)
        run_requests(engine, random_prompts(random.Random(config.seed + 1), vocab, warm_lens),
                     [SamplingParams(max_tokens=min(8, max(output_lens)), temperature=0.0, ignore_eos=True)] * warm,
                      "warmup", record_kv=False)
    before = scheduler_stats(engine)
    reset_peak_memory(device)
    logger.info(f"bench: timed run of {len(prompts)} requests")
    run = run_requests(engine, prompts, params, "req")
    logger.info(f"bench: done in {run.duration():.2f} s, {len(run.steps)} steps")
    memory = peak_memory(device)
    sched = delta(scheduler_stats(engine), before)

    duration = run.duration()
    n_out = sum(run.num_output.values())
    n_in = sum(len(p) for p in prompts)
    results = {"num_requests": len(prompts), "completed": len(run.finish), "duration_s": duration,
               "requests_per_s": len(run.finish) / duration, "output_tokens_per_s": n_out / duration,
               "total_tokens_per_s": (n_in + n_out) / duration, "total_prompt_tokens": n_in,
               "total_output_tokens": n_out, "expected_output_tokens": sum(output_lens) if args.ignore_eos else None,
               "input_lens": input_lens, "output_lens": [run.num_output.get(r, 0) for r in run.request_ids()],
               "max_output_lens": output_lens, "num_steps": len(run.steps),
               "bench_overhead_excluded_s": run.excluded}
    kv = summarize_kv(run.steps, engine.block_manager.num_blocks, engine.block_manager.block_size)
    bw = decode_bandwidth_of(engine, run.steps, peaks)
    hw = roofline_hardware(args, device_info(device))
    batch = min(len(prompts), config.max_num_seqs)
    waves = cdiv(len(prompts), batch)
    mean_in = round(statistics.fmean(input_lens))
    mean_out = max(1, round(statistics.fmean(output_lens)))
    predictions = []
    for r in roofline(engine, [hw, measured_hardware(hw, peaks)], batch, mean_in, mean_out):
        predicted = r.pop("report").e2e.tokens_per_s      # every wave is the same batch
        predictions.append({"hardware": r["hardware"], "metric": "output tokens/s", "predicted": predicted,
                            "measured": results["output_tokens_per_s"],
                            "ratio": results["output_tokens_per_s"] / predicted,
                            "assumes": f"{waves} wave(s) of {batch} sequences, prompt {mean_in}, output {mean_out}",
                            "bandwidth": r["bandwidth"], "flops": r["flops"]})
    out = {"model": engine_summary(engine), "runner": runner_info(engine), "peaks": peaks,
           "results": results, "latency_ms": {"ttft": distribution_ms(run.ttfts()), "itl": distribution_ms(run.itls()),
                                              "tpot": distribution_ms(run.tpots()),
                                              "e2e": distribution_ms(run.e2es())},
           "memory": memory, "kv": kv, "decode_bandwidth": bw, "scheduler": sched, "roofline": predictions,
           "checks": {"kv_waste_max": check(kv["waste_max"], TARGETS["kv_waste_max"], higher_is_better=False)},
           "_prompts": prompts}
    del engine, run
    return out


# ---------------------------------------------------------------- latency

def run_latency(args: argparse.Namespace) -> int:
    from pagellm.sampling_params import SamplingParams
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _positive(args, "batch_size", "input_len", "output_len", "num_iters")
    if args.max_num_seqs is None:
        args.max_num_seqs = args.batch_size
    config = _engine_config(args)
    device, dtype = config.torch_device, config.torch_dtype
    dev = device_info(device)
    peaks = measure_peaks(device, dtype, matmul=device.type == "cuda")
    result = _latency_engine_phase(args, config, device, peaks, SamplingParams)
    prompts = result.pop("_prompts")
    free_device_memory(result)
    if args.compare == "hf":
        from pagellm.bench.hf_baseline import run_hf
        logger.info("bench: HF generate")
        hf = run_hf("latency", config.model, dtype, device, prompts, args.output_len, args.hf_iters)
        ours, theirs = result["results"]["tpot_s"], hf.get("tpot_s")
        hf["speedup_tpot"] = theirs / ours if theirs and ours else None
        ours_ttft, theirs_ttft = result["results"]["ttft_s"], hf.get("ttft_s")
        hf["speedup_ttft"] = theirs_ttft / ours_ttft if theirs_ttft and ours_ttft else None
        hf["speedup_e2e"] = (hf["e2e_s"] / result["results"]["e2e_s"]) if hf.get("e2e_s") else None
        result["hf"] = hf
    payload = header(args, "latency", dev, config) | result
    res, bw = result["results"], result["decode_bandwidth"]
    rows = [("device", dev["name"]), ("model", result["model"]["name"] or config.model),
            ("batch x input -> output", f"{args.batch_size} x {args.input_len} -> {args.output_len}"),
            ("TTFT (mean)", fmt(res["ttft_s"] * 1e3, " ms")),
            ("time per output token (mean)", fmt(res["tpot_s"] * 1e3 if res["tpot_s"] else None, " ms", 3)),
            ("decode tokens/s per sequence", fmt(res["decode_tokens_per_s_per_seq"], digits=1)),
            ("end to end (mean)", fmt(res["e2e_s"], " s", 3)),
            ("decode bandwidth floor (ms/step)", fmt(bw["floor_seconds"] / bw["steps"] * 1e3 if bw["steps"] else None,
                                                     " ms", 3)),
            ("decode: fraction of bandwidth floor", pct(bw["fraction_of_floor"])),
            ("achieved bandwidth", fmt(bw["achieved_bandwidth"] / 1e9 if bw["achieved_bandwidth"] else None, " GB/s",
                                       0)),
            ("measured copy bandwidth", fmt(peaks["copy"]["bandwidth"] / 1e9, " GB/s", 0)),
            ("peak memory (allocated)", gib(result["memory"]["peak_allocated_bytes"]))]
    rows += speculation_rows(result["scheduler"])
    if "hf" in result:
        hf = result["hf"]
        rows += [("HF generate TTFT / per token", f"{fmt((hf.get('ttft_s') or 0) * 1e3, ' ms')} / "
                                                  f"{fmt((hf.get('tpot_s') or 0) * 1e3, ' ms', 3)}"),
                 ("speed-up per token vs HF generate", fmt(hf.get("speedup_tpot"), "x")),
                 ("HF error", hf.get("error") or "-")]
    print_tables("pagellm bench latency", rows, {k: result["latency_ms"][k] for k in ("ttft", "itl", "e2e")},
                 result["roofline"])
    write_json(args.json, payload)
    return 0


def _latency_engine_phase(args, config, device, peaks, SamplingParams) -> dict:
    engine = LLMEngine(config)
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(f"input + output length {args.input_len + args.output_len} is over max_model_len "
                         f"{engine.max_model_len}")
    vocab = engine.model_config.vocab_size
    rng = random.Random(config.seed)
    params = [SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)] * args.batch_size
    for i in range(args.warmup_iters):
        run_requests(engine, random_prompts(rng, vocab, [args.input_len] * args.batch_size), params,
                     f"warmup{i}", record_kv=False)
    reset_peak_memory(device)
    before = scheduler_stats(engine)
    runs, first_prompts = [], None
    for i in range(args.num_iters):
        prompts = random_prompts(rng, vocab, [args.input_len] * args.batch_size)   # fresh: no prefix-cache hits
        first_prompts = first_prompts or prompts
        runs.append(run_requests(engine, prompts, params, f"iter{i}"))
    memory = peak_memory(device)
    steps = [s for r in runs for s in r.steps]
    ttfts = [t for r in runs for t in r.ttfts()]
    tpots = [t for r in runs for t in r.tpots()]
    e2es = [r.duration() for r in runs]
    tpot = statistics.fmean(tpots) if tpots else None
    results = {"batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
               "iters": args.num_iters, "ttft_s": statistics.fmean(ttfts), "tpot_s": tpot,
               "decode_tokens_per_s_per_seq": 1 / tpot if tpot else None,
               "decode_tokens_per_s": args.batch_size / tpot if tpot else None,
               "e2e_s": statistics.fmean(e2es),
               "output_tokens": [sum(r.num_output.values()) for r in runs],
               "bench_overhead_excluded_s": sum(r.excluded for r in runs)}
    bw = decode_bandwidth_of(engine, steps, peaks)
    hw = roofline_hardware(args, device_info(device))
    predictions = []
    from pagellm.analysis import prediction_vs_measurement
    for r in roofline(engine, [hw, measured_hardware(hw, peaks)], args.batch_size, args.input_len,
                      args.output_len):
        for row in prediction_vs_measurement(r.pop("report"), ttft_s=results["ttft_s"], tpot_s=tpot):
            predictions.append(row | {"hardware": r["hardware"], "bandwidth": r["bandwidth"], "flops": r["flops"]})
    out = {"model": engine_summary(engine), "runner": runner_info(engine), "peaks": peaks, "results": results,
           "latency_ms": {"ttft": distribution_ms(ttfts), "itl": distribution_ms([t for r in runs for t in r.itls()]),
                          "tpot": distribution_ms(tpots), "e2e": distribution_ms(e2es)},
           "memory": memory, "kv": summarize_kv(steps, engine.block_manager.num_blocks, engine.block_manager.block_size),
           "decode_bandwidth": bw, "scheduler": delta(scheduler_stats(engine), before), "roofline": predictions,
           "checks": {"decode_fraction_of_floor": check(bw["fraction_of_floor"],
                                                        TARGETS["decode_fraction_of_floor"])},
           "_prompts": first_prompts}
    del engine, runs
    return out


# ---------------------------------------------------------------- prefill

def run_prefill(args: argparse.Namespace) -> int:
    from pagellm.sampling_params import SamplingParams
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _positive(args, "batch_size", "input_len", "num_iters")
    tokens = args.batch_size * args.input_len
    if args.max_num_seqs is None or args.max_num_seqs < args.batch_size:
        args.max_num_seqs = args.batch_size
    if args.max_num_batched_tokens is None or args.max_num_batched_tokens < tokens:
        args.max_num_batched_tokens = tokens
    config = _engine_config(args)
    device, dtype = config.torch_device, config.torch_dtype
    dev = device_info(device)
    peaks = measure_peaks(device, dtype, matmul=device.type == "cuda")
    result = _prefill_engine_phase(args, config, device, peaks, SamplingParams)
    free_device_memory()
    if args.compare == "hf":
        result["hf"] = {"error": "--compare hf is not implemented for bench prefill"}
    payload = header(args, "prefill", dev, config) | result
    res = result["results"]
    rows = [("device", dev["name"]), ("model", result["model"]["name"] or config.model),
            ("batch x input", f"{args.batch_size} x {args.input_len} = {tokens:,} tokens"),
            ("step time (median / min)", f"{res['step_s_median'] * 1e3:,.1f} / {res['step_s_min'] * 1e3:,.1f} ms"),
            ("prefill tokens/s", fmt(res["tokens_per_s"], digits=0)),
            ("FLOPs per step (closed form)", f"{res['flops']['total']:.4g}"),
            ("achieved TFLOP/s", fmt(res["achieved_flops"] / 1e12, digits=1)),
            ("measured matmul TFLOP/s", fmt(res["matmul_flops"] / 1e12 if res["matmul_flops"] else None, digits=1)),
            ("fraction of matmul rate", pct(res["fraction_of_matmul"])),
            ("peak memory (allocated)", gib(result["memory"]["peak_allocated_bytes"]))]
    print_tables("pagellm bench prefill", rows, {}, result["roofline"])
    write_json(args.json, payload)
    return 0


def _prefill_engine_phase(args, config, device, peaks, SamplingParams) -> dict:
    engine = LLMEngine(config)
    vocab = engine.model_config.vocab_size
    rng = random.Random(config.seed)
    params = [SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)] * args.batch_size
    tokens = args.batch_size * args.input_len
    times, batches = [], []
    for i in range(args.warmup_iters + args.num_iters):
        if i == args.warmup_iters:
            reset_peak_memory(device)
        prompts = random_prompts(rng, vocab, [args.input_len] * args.batch_size)   # fresh: nothing cached
        run = Run(engine, record_kv=False)
        for j, prompt in enumerate(prompts):
            run.add(f"prefill{i}-{j}", prompt, params[j])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        run.go()
        if i >= args.warmup_iters:
            times.append(run.steps[0].seconds if len(run.steps) == 1 else run.duration())
            batches.append([(s.num_seqs, s.num_tokens) for s in run.steps])
    memory = peak_memory(device)
    one_step = all(len(b) == 1 and b[0] == (args.batch_size, tokens) for b in batches)
    flops = prefill_flops(engine.model_config, args.batch_size, args.input_len)
    median = statistics.median(times)
    mm = (peaks.get("matmul") or {}).get("flops")
    results = {"batch_size": args.batch_size, "input_len": args.input_len, "tokens": tokens,
               "iters": args.num_iters, "step_s": times, "step_s_median": median, "step_s_min": min(times),
               "one_step_per_iter": one_step, "steps_per_iter": batches,
               "tokens_per_s": tokens / median, "flops": flops, "achieved_flops": flops["total"] / median,
               "matmul_flops": mm, "fraction_of_matmul": flops["total"] / median / mm if mm else None}
    from pagellm.analysis import analyze_step
    from pagellm.sizing import Precision
    hw = roofline_hardware(args, device_info(device))
    bits = bits_of(engine)
    predictions = []
    for h in (hw, measured_hardware(hw, peaks)):
        if h is None:
            continue
        step = analyze_step(engine.model_config, h, args.batch_size, args.input_len, 0,
                            Precision(w_bits=bits, a_bits=bits, kv_bits=bits, base_bits=bits), flash_attention=True)
        predictions.append({"hardware": h.name, "metric": "prefill step s", "predicted": step.time_s,
                            "measured": median, "ratio": median / step.time_s if step.time_s else None,
                            "predicted_ops": step.ops, "bandwidth": h.bandwidth, "flops": h.fp16_flops})
    out = {"model": engine_summary(engine), "runner": runner_info(engine), "peaks": peaks, "results": results,
           "memory": memory, "roofline": predictions,
           "checks": {"prefill_fraction_of_matmul": check(results["fraction_of_matmul"],
                                                          TARGETS["prefill_fraction_of_matmul"])}}
    del engine
    return out
