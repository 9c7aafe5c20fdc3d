"""Where a batched step's time goes (issue 10): host phases, device phases and
kernels of engine steps, on one GPU, in one process (random Llama-3-8B shapes,
bf16, one engine), the table printed last.

    PYTHONPATH=. python3 benchmarks/decode_step_profile.py --out $OUT

A ``Timeline`` wraps the engine's step parts and records, for every
``engine.step()`` call: the host time of scheduling, of building the
``StepInput``, of launching it (the eager forward's Python, or a graph's input
copies and replay), and of waiting for the device; and, on the device (CUDA
events on the one stream), when the launched step began, when its forward
began (after its input copies), when sampling began and ended, and when its
last work ended. A step whose first event fires after the previous step's last
one found the device idle: the host was late (``idle``). Each step's floor is
max(bytes / copy bandwidth, FLOPs / matmul rate), both measured here: bytes =
the weights a step reads + the K/V of every context token it attends to,
FLOPs = 2 x linear parameters x tokens + LM head rows + attention pairs.

1. ``decode_64x4096_as_measured``: the engine part of ``kv_quant_gpu.py``
   (64 prompts of 4,096 tokens, 64 output tokens, no prompt-token cap as in
   that run): its ``decode_tok_s`` (the time of each ``engine.step()`` call
   given to the batch *scheduled* in it, which under the asynchronous pipeline
   is the step *read* one call later) against the same steps attributed to the
   batch read in that call, and the batch sizes of those steps.
2. ``decode_64x4096``: 64 sequences decoding at 4,096-token contexts, steady
   state: phases per step with graphs + pipeline (the defaults), pipeline off,
   graphs off; a ``torch.profiler`` kernel table of graphed steps. ``decode_144x1024``: the
   same at the second workload's typical decode step (mean batch ~140, contexts ~1k), defaults only.
3. ``workloads``: the issue's first and second workloads (256 requests, in
   100-1,024, out 100-1,024 for the second), every step on the timeline: time
   by step kind (decode graph, varlen graph, eager) against each step's floor,
   device idle time, ITL and TTFT; variants of the cap on prompt tokens beside
   decodes and of the largest varlen graph a step may replay (``--workloads``;
   the engine captures up to ``--graph-tokens``).
4. ``bs1``: one sequence, 128 -> 128: step wall time against the replay.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench_run import run_section
from pagellm import SamplingParams
from pagellm.bench.report import measured_hardware, roofline, roofline_hardware
from pagellm.bench.runner import device_info, measure_peaks, random_prompts, run_requests
from pagellm.bench.stats import decode_weight_bytes, distribution_ms, linear_params_per_token
from pagellm.config import EngineConfig
from pagellm.engine import llm_engine as llm_engine_module
from pagellm.engine import model_runner as model_runner_module
from pagellm.engine.llm_engine import LLMEngine

RESULTS: dict = {}
SAVE = [lambda: None]   # writes RESULTS (set by main)


# --------------------------------------------------------------------------- step shapes and floors

@dataclass
class Shape:
    """What a scheduled batch computes (taken when it is scheduled)."""
    num_seqs: int
    num_tokens: int
    decode_tokens: int      # sequences computing exactly their newest (sampled) token
    context_tokens: int     # sum of the sequences' context lengths after the step (K/V read)
    attention_pairs: int    # query-key pairs over all new tokens
    logits_rows: int

    @property
    def decode_only(self) -> bool:
        return self.num_seqs > 0 and self.decode_tokens == self.num_tokens

    @classmethod
    def of(cls, batch) -> Shape:
        decode = pairs = context = rows = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            decode += n == 1 and seq.num_output_tokens > 0 and start == seq.num_tokens - 1
            context += start + n
            pairs += n * start + n * (n + 1) // 2
            rows += start + n == seq.num_tokens
        return cls(len(batch.seqs), batch.num_tokens, decode, context, pairs, rows)


@dataclass
class Floor:
    """A step's bound from the measured peaks (see the module docstring)."""
    bandwidth: float
    flops: float
    config: object
    weights_bytes: int
    element_size: int
    kv_bytes_per_token: int

    def seconds(self, s: Shape) -> float:
        c = self.config
        weights = decode_weight_bytes(c, self.weights_bytes, self.element_size, s.num_tokens)
        read = weights + s.context_tokens * self.kv_bytes_per_token
        ops = (2 * linear_params_per_token(c) * s.num_tokens + 2 * c.hidden_size * c.vocab_size * s.logits_rows
               + 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * s.attention_pairs)
        return max(read / self.bandwidth, ops / self.flops)


# --------------------------------------------------------------------------- the timeline

@dataclass
class StepTimes:
    """One launched step: host seconds of its parts and its device events."""
    shape: Shape
    schedule_s: float
    build_s: float = 0.0
    launch_s: float = 0.0
    graph: str = "eager"     # "decode" / "varlen" graph or "eager"
    events: dict = field(default_factory=dict)   # start, forward, sample, sampled, end
    device: dict = field(default_factory=dict)   # filled by Timeline.resolve


@dataclass
class CallTimes:
    """One ``engine.step()`` call: its wall time, what it launched and what it read."""
    wall_s: float
    wait_s: float
    launched: StepTimes | None
    read: list[Shape]


_MISSING = object()


class HostEvent:
    """A CUDA event's interface on the host clock (CPU smoke runs: ``--small``)."""

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.time - self.time) * 1e3


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timeline:
    """Wraps an engine's step parts (module docstring); ``close()`` unwraps them."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.calls: list[CallTimes] = []
        self.steps: list[StepTimes] = []
        self._shapes: dict[int, Shape] = {}
        self._current: StepTimes | None = None
        self._read: list[Shape] = []
        self._wait = 0.0
        self._undo: list = []
        runner = engine.runner
        self._wrap(engine.scheduler, "schedule", self._timed_schedule)
        self._wrap(llm_engine_module, "build_step_input", self._timed("build_s"))
        self._wrap(runner, "launch", self._timed_launch)
        self._wrap(runner, "prepare", self._event_after("forward"))
        self._wrap(model_runner_module, "draw_tokens", self._sampling)
        self._wrap(model_runner_module.PendingOutput, "result", self._timed_result)
        if runner.graphs is not None:
            self._wrap(runner.graphs, "run", self._graph_run)
        engine.add_observer(self)

    # ---- wrapping
    def _wrap(self, owner, name: str, make) -> None:
        self._undo.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, make(getattr(owner, name)))

    def close(self) -> None:
        for owner, name, before in reversed(self._undo):
            if before is _MISSING:
                delattr(owner, name)   # the wrapper shadowed a method of the instance's class
            else:
                setattr(owner, name, before)
        self._undo = []
        self.engine.remove_observer(self)

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else HostEvent()
        event.record()
        return event

    def _timed_schedule(self, original):
        def schedule():
            start = time.perf_counter()
            batch = original()
            self._current = StepTimes(Shape.of(batch), time.perf_counter() - start)
            return batch
        return schedule

    def _timed(self, key: str):
        def make(original):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                out = original(*args, **kwargs)
                setattr(self._current, key, getattr(self._current, key) + time.perf_counter() - start)
                return out
            return timed
        return make

    def _timed_launch(self, original):
        def launch(*steps):
            current = self._current
            current.events["start"] = self._event()
            start = time.perf_counter()
            out = original(*steps)
            current.launch_s = time.perf_counter() - start
            current.events["end"] = self._event()
            self.steps.append(current)
            return out
        return launch

    def _event_after(self, name: str):
        def make(original):
            def wrapped(*args, **kwargs):
                out = original(*args, **kwargs)
                if self._current is not None:
                    self._current.events.setdefault(name, self._event())
                return out
            return wrapped
        return make

    def _sampling(self, original):
        def draw(*args, **kwargs):
            self._current.events.setdefault("sample", self._event())
            out = original(*args, **kwargs)
            self._current.events.setdefault("sampled", self._event())
            return out
        return draw

    def _timed_result(self, original):
        timeline = self

        def result(pending):
            start = time.perf_counter()
            out = original(pending)
            timeline._wait += time.perf_counter() - start
            return out
        return result

    def _graph_run(self, original):
        def run(shape, *args, **kwargs):
            self._current.graph = "decode" if shape.decode else "varlen"
            return original(shape, *args, **kwargs)
        return run

    # ---- observer
    def on_schedule(self, batch) -> None:
        if batch:
            self._shapes[id(batch)] = self._current.shape

    def on_step(self, batch, outputs) -> None:
        self._read.append(self._shapes.pop(id(batch)))

    # ---- driving
    def step(self) -> list:
        self._current, self._read, self._wait = None, [], 0.0
        launched_before = len(self.steps)
        start = time.perf_counter()
        outputs = LLMEngine.step(self.engine)   # the engine's own step, even while ``engine.step`` is this
        wall = time.perf_counter() - start
        launched = self.steps[-1] if len(self.steps) > launched_before else None
        self.calls.append(CallTimes(wall, self._wait, launched, self._read))
        return outputs

    def resolve(self) -> None:
        """Device times of every step (after a sync): phases, and the idle time before each."""
        synchronize()
        previous_end = None
        for s in self.steps:
            e = s.events
            ms = lambda a, b: e[a].elapsed_time(e[b]) if a in e and b in e else None  # noqa: E731
            s.device = {"total_ms": ms("start", "end"), "inputs_ms": ms("start", "forward"),
                        "forward_ms": ms("forward", "sample"), "sample_ms": ms("sample", "sampled"),
                        "after_ms": ms("sampled", "end"),
                        "idle_before_ms": max(0.0, previous_end.elapsed_time(e["start"])) if previous_end else 0.0}
            previous_end = e["end"]
            s.events = {}


def steps_to_completion(engine: LLMEngine) -> Timeline:
    """Step the engine until its requests are done, every call on a (resolved) timeline."""
    timeline = Timeline(engine)
    try:
        while engine.has_unfinished_requests():
            timeline.step()
    finally:
        timeline.close()
    timeline.resolve()
    return timeline


def run_steps(timeline: Timeline, count: int) -> None:
    for _ in range(count):
        timeline.step()


def summarize(timeline: Timeline, floor: Floor | None, calls: list[CallTimes] | None = None) -> dict:
    """Means per step of host and device phases, and the floor of the steps launched."""
    calls = calls if calls is not None else timeline.calls
    steps = [c.launched for c in calls if c.launched is not None]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731

    def dev(key):
        return mean([s.device[key] for s in steps if s.device.get(key) is not None])

    out = {"calls": len(calls), "wall_ms": mean([c.wall_s * 1e3 for c in calls]),
           "host_schedule_ms": mean([s.schedule_s * 1e3 for s in steps]),
           "host_build_ms": mean([s.build_s * 1e3 for s in steps]),
           "host_launch_ms": mean([s.launch_s * 1e3 for s in steps]),
           "host_wait_ms": mean([c.wait_s * 1e3 for c in calls]),
           "host_rest_ms": mean([(c.wall_s - c.wait_s - (c.launched.schedule_s + c.launched.build_s
                                                         + c.launched.launch_s if c.launched else 0)) * 1e3
                                 for c in calls]),
           "device_step_ms": dev("total_ms"), "device_inputs_ms": dev("inputs_ms"),
           "device_forward_ms": dev("forward_ms"), "device_sample_ms": dev("sample_ms"),
           "device_after_ms": dev("after_ms"), "device_idle_before_ms": dev("idle_before_ms"),
           "graphs": sorted({s.graph for s in steps}),
           "mean_seqs": mean([s.shape.num_seqs for s in steps]), "mean_tokens": mean([s.shape.num_tokens for s in steps])}
    if floor is not None and steps:
        out["floor_ms"] = mean([floor.seconds(s.shape) * 1e3 for s in steps])
        out["floor_over_wall"] = out["floor_ms"] / out["wall_ms"]
        out["floor_over_device"] = out["floor_ms"] / out["device_step_ms"] if out["device_step_ms"] else None
    return out


# --------------------------------------------------------------------------- sections

def add_requests(engine: LLMEngine, tag: str, lens: list[int], max_tokens: list[int], seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = random_prompts(rng, engine.model_config.vocab_size, lens)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt, n in zip(ids, prompts, max_tokens):
        engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return ids


def as_measured(engine: LLMEngine, floor: Floor, small: bool) -> dict:
    """kv_quant_gpu.py's engine run, with both attributions of each call's time."""
    n, length, out_len = (64, 4096, 64) if not small else (8, 40, 12)
    engine.scheduler.config.max_prefill_tokens_with_decodes = None   # as when that run was recorded
    add_requests(engine, "measured", [length] * n, [out_len] * n, seed=1)
    try:
        timeline = steps_to_completion(engine)
    finally:
        engine.scheduler.config.max_prefill_tokens_with_decodes = engine.config.prefill_tokens_with_decodes
    calls = [c for c in timeline.calls if c.launched is not None or c.read]
    by_schedule = [c for c in calls if c.launched is not None and c.launched.shape.decode_only]
    by_read = [c for c in calls if len(c.read) == 1 and c.read[0].decode_only]

    def rate(pairs):
        tokens = sum(shape.num_tokens for shape, _ in pairs)
        return {"steps": len(pairs), "decode_tok_s": tokens / sum(c.wall_s for _, c in pairs),
                "mean_batch": statistics.fmean(shape.num_seqs for shape, _ in pairs),
                "mean_call_ms": statistics.fmean(c.wall_s for _, c in pairs) * 1e3,
                "longest_call_ms": max(c.wall_s for _, c in pairs) * 1e3}

    decode_steps = [s for s in timeline.steps if s.shape.decode_only]
    full = [s for s in decode_steps if s.shape.num_seqs == n]
    out = {"requests": n, "prompt": length, "output": out_len,
           "attributed_to_scheduled_batch": rate([(c.launched.shape, c) for c in by_schedule]),
           "attributed_to_read_batch": rate([(c.read[0], c) for c in by_read]),
           "decode_steps_device_ms_by_batch": {
               str(b): statistics.fmean(s.device["total_ms"] for s in decode_steps if s.shape.num_seqs == b)
               for b in sorted({s.shape.num_seqs for s in decode_steps}, reverse=True)[:4]},
           "full_batch_decode_steps": len(full)}
    if full:
        out["full_batch_device_ms"] = statistics.fmean(s.device["total_ms"] for s in full)
        out["full_batch_floor_ms"] = statistics.fmean(floor.seconds(s.shape) for s in full) * 1e3
    print(json.dumps(out, indent=1), flush=True)
    return out


def steady_decode(engine: LLMEngine, floor: Floor, num_seqs: int, length: int, variants: bool) -> dict:
    """``num_seqs`` sequences decoding at ``length``-token contexts: the variants' phases and a kernel profile."""
    engine.scheduler.config.max_prefill_tokens_with_decodes = None   # prefill fast; decode-only steps follow
    timeline = Timeline(engine)
    out = {}
    try:
        ids = add_requests(engine, f"steady{num_seqs}", [length] * num_seqs,
                           [engine.max_model_len - length - 8] * num_seqs, seed=num_seqs)
        while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
            engine.step()
        run_steps(timeline, 3)
        graphs = engine.runner.graphs
        settings = [("graphs + pipeline (defaults)", dict(overlap=True), 20)]
        if variants:
            settings += [("pipeline off", dict(overlap=False), 10), ("graphs off", dict(overlap=True, graphs=None), 5),
                         ("graphs + pipeline again", dict(overlap=True), 10)]
        for name, setting, count in settings:
            engine.overlap = setting["overlap"]
            engine.runner.graphs = setting.get("graphs", graphs)
            run_steps(timeline, 2)
            first = len(timeline.calls)
            run_steps(timeline, count)
            out[name] = timeline.calls[first:]
        engine.runner.graphs, engine.overlap = graphs, True
        out["kernels"] = kernel_profile(timeline, 5)
    finally:
        timeline.close()
        for rid in list(engine.requests):
            engine.abort_request(rid)
        while engine.has_unfinished_requests() or engine.step_in_flight:
            engine.step()
        engine.scheduler.config.max_prefill_tokens_with_decodes = engine.config.prefill_tokens_with_decodes
    timeline.resolve()
    result = {name: summarize(timeline, floor, calls) for name, calls in out.items() if name != "kernels"}
    result["kernels"] = out["kernels"]
    print(json.dumps(result, indent=1), flush=True)
    return result


def kernel_profile(timeline: Timeline, count: int) -> dict:
    """Device time by kernel over ``count`` steps (torch.profiler), and the GPU-busy share of the wall."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    synchronize()
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        run_steps(timeline, count)
        synchronize()
    wall = time.perf_counter() - start
    rows, cpu = [], []
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if device_us and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            rows.append((e.key[:100], e.count / count, device_us / count))
        elif e.self_cpu_time_total:
            cpu.append((e.key[:100], e.count / count, e.self_cpu_time_total / count))
    rows.sort(key=lambda r: -r[2])
    cpu.sort(key=lambda r: -r[2])
    busy = sum(r[2] for r in rows)
    return {"steps": count, "wall_ms_per_step_profiled": wall / count * 1e3, "kernel_us_per_step": busy,
            "launches_per_step": sum(r[1] for r in rows),
            "by_kernel": [{"name": k, "calls": c, "us": t} for k, c, t in rows[:20]],
            "host_self_us_top": [{"name": k, "calls": c, "us": t} for k, c, t in cpu[:12]]}


# as async_pipeline_gpu.py; 0: its warm-up (the second workload's prompts, 8-16 output tokens: builds the kernels)
WORKLOADS = {0: (256, (100, 1024), (8, 16)), 1: (256, (32, 512), (256, 256)), 2: (256, (100, 1024), (100, 1024))}


def workload(engine: LLMEngine, floor: Floor, peaks: dict, small: bool, number: int, cap: int,
             graph_tokens: int, seed: int) -> dict:
    """One of the issue's workloads with every step on the timeline, by step kind, with ``cap`` prompt
    tokens beside decodes and varlen graphs up to ``graph_tokens`` tokens (of those captured)."""
    n, inputs, outputs = WORKLOADS[number] if not small else (8, (10, 60), (10, 60))
    rng = random.Random(seed)
    in_lens = [rng.randint(*inputs) for _ in range(n)]
    out_lens = [rng.randint(*outputs) for _ in range(n)]
    prompts = random_prompts(rng, engine.model_config.vocab_size, in_lens)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]
    graphs = engine.runner.graphs
    captured = graphs.token_sizes if graphs is not None else []
    engine.scheduler.config.max_prefill_tokens_with_decodes = cap
    timeline = Timeline(engine)
    try:
        if graphs is not None:
            graphs.token_sizes = [t for t in captured if t <= graph_tokens]
        largest_graph = max(graphs.token_sizes, default=0) if graphs is not None else 0
        engine.step = timeline.step    # run_requests drives engine.step(): every call goes on the timeline
        run = run_requests(engine, prompts, params, f"w{number}-{seed}", record_kv=False)
    finally:
        del engine.step
        timeline.close()
        if graphs is not None:
            graphs.token_sizes = captured
        engine.scheduler.config.max_prefill_tokens_with_decodes = engine.config.prefill_tokens_with_decodes
    timeline.resolve()
    kinds = {}
    for c in timeline.calls:
        s = c.launched
        kind = "nothing launched" if s is None else (
            f"{s.graph} {'decode-only' if s.shape.decode_only else 'mixed'}")
        kinds.setdefault(kind, []).append(c)
    by_kind = {}
    for kind, calls in kinds.items():
        steps = [c.launched for c in calls if c.launched is not None]
        row = {"calls": len(calls), "wall_s": sum(c.wall_s for c in calls),
               "device_s": sum(s.device["total_ms"] for s in steps) / 1e3,
               "device_idle_before_s": sum(s.device["idle_before_ms"] for s in steps) / 1e3,
               "floor_s": sum(floor.seconds(s.shape) for s in steps),
               "host_launch_s": sum(s.launch_s for s in steps),
               "host_schedule_build_s": sum(s.schedule_s + s.build_s for s in steps),
               "tokens": sum(s.shape.num_tokens for s in steps),
               "mean_seqs": statistics.fmean(s.shape.num_seqs for s in steps) if steps else 0}
        by_kind[kind] = row
    steps = timeline.steps
    duration = run.duration()
    n_out = sum(run.num_output.values())
    itl, ttft = distribution_ms(run.itls()), distribution_ms(run.ttfts())
    out = {"workload": number, "requests": n, "max_prefill_tokens_with_decodes": cap,
           "graph_tokens": largest_graph,
           "duration_s": duration, "output_tokens_per_s": n_out / duration,
           "total_tokens_per_s": (n_out + sum(in_lens)) / duration, "itl_ms": itl, "ttft_ms": ttft,
           "itl_p99_over_p50": itl["p99"] / itl["p50"] if itl.get("p50") else None,
           "wall_in_steps_s": sum(c.wall_s for c in timeline.calls),
           "device_busy_s": sum(s.device["total_ms"] for s in steps) / 1e3,
           "device_idle_s": sum(s.device["idle_before_ms"] for s in steps) / 1e3,
           "floor_s": sum(floor.seconds(s.shape) for s in steps), "by_kind": by_kind,
           "batch_histogram": histogram([s.shape.num_seqs for s in steps if s.shape.decode_only])}
    hw = roofline_hardware(argparse.Namespace(hardware=None, bandwidth=None, flops=None),
                           device_info(engine.runner.device))
    measured = measured_hardware(hw, peaks)
    if measured is not None:
        r = roofline(engine, [measured], n, round(statistics.fmean(in_lens)), round(statistics.fmean(out_lens)))[0]
        out["roofline_output_tokens_per_s"] = r["report"].e2e.tokens_per_s
        out["roofline_seconds"] = n_out / out["roofline_output_tokens_per_s"]
        out["fraction_of_roofline"] = out["output_tokens_per_s"] / out["roofline_output_tokens_per_s"]
    out["floor_over_duration"] = out["floor_s"] / duration
    out["decode_only_steps"] = summarize(timeline, floor, [c for c in timeline.calls
                                                           if c.launched is not None and c.launched.shape.decode_only])
    print(json.dumps({k: v for k, v in out.items() if k not in ("by_kind", "decode_only_steps")}), flush=True)
    return out


def workload_variants(engine: LLMEngine, floor: Floor, peaks: dict, small: bool, variants: list[str]) -> list:
    """``W:GRAPH_TOKENS:CAP`` each: workload W with varlen graphs up to GRAPH_TOKENS and that cap."""
    rows = []
    for seed, variant in enumerate(variants, start=10):
        number, graph_tokens, cap = (int(x) for x in variant.split(":"))
        rows.append(workload(engine, floor, peaks, small, number, cap, graph_tokens, seed))
        RESULTS["workloads"] = rows
        SAVE[0]()
    return rows


def histogram(values: list[int], edges=(1, 16, 64, 128, 192, 256, 1 << 30)) -> dict:
    return {f"{lo}-{hi - 1}": sum(lo <= v < hi for v in values) for lo, hi in zip(edges, edges[1:])}


def bs1(engine: LLMEngine, floor: Floor, small: bool) -> dict:
    add_requests(engine, "bs1", [128 if not small else 20], [128 if not small else 20], seed=3)
    timeline = steps_to_completion(engine)
    decode = [c for c in timeline.calls if c.launched is not None and c.launched.shape.decode_only][5:]
    out = summarize(timeline, floor, decode)
    print(json.dumps(out, indent=1), flush=True)
    return out


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run with a tiny model)")
    parser.add_argument("--sections", default="measured,steady,steady144,workloads,bs1")
    parser.add_argument("--graph-tokens", type=int, default=None, help="cuda_graph_max_tokens of the engine "
                        "(default: the engine's)")
    parser.add_argument("--workloads", default="2:512:2048",
                        help="W:GRAPH_TOKENS:CAP,...: workload W (1 or 2; 0: a warm-up), varlen graphs up to GRAPH_TOKENS "
                             "(of those captured), CAP prompt tokens beside decodes")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if cuda:
        import triton
    RESULTS.update(device=torch.cuda.get_device_name() if cuda else "cpu",
                   versions={"torch": torch.__version__, "triton": triton.__version__ if cuda else None},
                   command="PYTHONPATH=. python3 " + " ".join(sys.argv),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def save():
        (out_dir / "decode_step_profile.json").write_text(json.dumps(RESULTS, indent=1, default=str))

    SAVE[0] = save

    small = args.small
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(args.model, random_weights=True, dtype="bfloat16" if not small else "float32",
                                    kv_cache_memory="60GiB" if not small else "512MiB",
                                    max_model_len=4224 if not small else 256,
                                    **({"cuda_graph_max_tokens": args.graph_tokens} if args.graph_tokens else {})))
    RESULTS["startup_s"] = time.perf_counter() - start
    peaks = measure_peaks(engine.runner.device, engine.runner.dtype, matmul=True)
    RESULTS["peaks"] = peaks
    mem = engine.runner.memory
    flops = peaks["matmul"]["flops"] if peaks.get("matmul") else 1e12   # no matmul peak measured on the CPU
    floor = Floor(peaks["copy"]["bandwidth"], flops, engine.model_config, mem.weights_bytes,
                  torch.tensor([], dtype=engine.runner.dtype).element_size(), mem.kv_bytes_per_token)
    sections = args.sections.split(",")
    path = str(out_dir / "decode_step_profile.json")
    runs = {"measured": ("decode_64x4096_as_measured", lambda: as_measured(engine, floor, small)),
            "steady": ("decode_64x4096", lambda: steady_decode(engine, floor, *((64, 4096) if not small else (8, 40)),
                                                             True)),
            "steady144": ("decode_144x1024", lambda: steady_decode(engine, floor,
                                                                   *((144, 1024) if not small else (8, 20)), False)),
            "workloads": ("workloads", lambda: workload_variants(engine, floor, peaks, small,
                                                                 args.workloads.split(","))),
            "bs1": ("bs1", lambda: bs1(engine, floor, small))}
    for key, (name, run) in runs.items():   # in this order, whatever the order of --sections
        if key in sections:
            run_section(RESULTS, name, run, path)
    RESULTS["seconds"] = time.perf_counter() - start
    save()
    print_table()


def print_table() -> None:
    print(f"\n{'variant':42} {'wall ms':>8} {'dev ms':>7} {'idle':>6} {'fwd':>7} {'sample':>6} {'sched':>6} "
          f"{'build':>6} {'launch':>6} {'floor':>6} {'fl/wall':>7}")
    rows = {}
    for label in ("decode_64x4096", "decode_144x1024"):
        if isinstance(RESULTS.get(label), dict):
            rows |= {f"{label[7:]} {k}": v for k, v in RESULTS[label].items() if k != "kernels"}
    if isinstance(RESULTS.get("bs1"), dict) and "wall_ms" in RESULTS["bs1"]:
        rows["bs1 decode"] = RESULTS["bs1"]
    for name, r in rows.items():
        if not isinstance(r, dict) or "wall_ms" not in r:
            continue
        f = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"  # noqa: E731
        print(f"{name:42} {f('wall_ms'):>8} {f('device_step_ms'):>7} {f('device_idle_before_ms'):>6} "
              f"{f('device_forward_ms'):>7} {f('device_sample_ms'):>6} {f('host_schedule_ms'):>6} "
              f"{f('host_build_ms'):>6} {f('host_launch_ms'):>6} {f('floor_ms'):>6} {f('floor_over_wall'):>7}")
    for label in ("decode_64x4096", "decode_144x1024"):
        kernels = (RESULTS.get(label) or {}).get("kernels")
        if isinstance(kernels, dict):
            print(f"\nkernels per graphed step ({label[7:]}): {kernels['kernel_us_per_step'] / 1e3:.2f} ms busy of "
                  f"{kernels['wall_ms_per_step_profiled']:.2f} ms wall")
            for k in kernels["by_kernel"][:12]:
                print(f"  {k['us']:9.1f} us {k['calls']:6.0f}x  {k['name'][:90]}")
    m = RESULTS.get("decode_64x4096_as_measured")
    if isinstance(m, dict) and "attributed_to_read_batch" in m:
        a, b = m["attributed_to_scheduled_batch"], m["attributed_to_read_batch"]
        print(f"\nkv_quant_gpu decode 64x4096: as recorded (scheduled batch) {a['decode_tok_s']:.0f} tok/s over "
              f"{a['steps']} steps, mean batch {a['mean_batch']:.1f}, longest call {a['longest_call_ms']:.0f} ms; "
              f"read batch {b['decode_tok_s']:.0f} tok/s, mean batch {b['mean_batch']:.1f}; full-batch device "
              f"{m.get('full_batch_device_ms', 0):.2f} ms vs floor {m.get('full_batch_floor_ms', 0):.2f} ms")
    workloads = RESULTS.get("workloads")
    if not isinstance(workloads, list):
        return
    print(f"\n{'workload, graphs <= T, cap':28} {'out tok/s':>9} {'roofline':>8} {'ITL p50':>7} {'p99':>6} {'p99/p50':>7} "
          f"{'TTFT p50':>8} {'dev busy':>8} {'idle':>5} {'floors':>6} {'eager':>5}")
    for w in workloads:
        eager = sum(r["calls"] for k, r in w["by_kind"].items() if k.startswith("eager"))
        name = f"w{w['workload']}, {w['graph_tokens']}, {w['max_prefill_tokens_with_decodes']}"
        print(f"{name:28} {w['output_tokens_per_s']:9.0f} {w.get('fraction_of_roofline', 0):8.1%} "
              f"{w['itl_ms']['p50']:7.1f} {w['itl_ms']['p99']:6.1f} {w['itl_p99_over_p50']:7.2f} "
              f"{w['ttft_ms']['p50'] / 1e3:7.2f}s {w['device_busy_s']:8.2f} {w['device_idle_s']:5.2f} "
              f"{w['floor_s']:6.2f} {eager:5d}")
        for kind, r in w["by_kind"].items():
            print(f"    {kind:24} {r['calls']:5d} calls, wall {r['wall_s']:6.2f} s, device {r['device_s']:6.2f} s, "
                  f"idle {r['device_idle_before_s']:5.2f} s, floor {r['floor_s']:6.2f} s, host launch "
                  f"{r['host_launch_s']:5.2f} s, {r['mean_seqs']:.0f} seqs")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
