"""The engine side of the offline benchmarks: stepping it while timing
every request and every step (``Run``), and reading its memory and stats.

Timestamps are ``time.perf_counter``, taken as outputs come back from
``engine.step()``. The bench's own bookkeeping between steps (outputs, KV
occupancy) runs off the clock when the step ended with a host sync (the
sampler's ``.tolist()``: every step that sampled a token), because the device
is idle then; after a step that sampled nothing it stays on the clock, and the
next step is not used for per-step bandwidth figures.
"""
from __future__ import annotations

import gc
import itertools
import platform
import random
import time
from dataclasses import asdict

import torch

from pagellm.bench.stats import (StepRecord, StepRecorder, decode_bandwidth, kv_occupancy, measure_copy_bandwidth,
                                 measure_matmul_flops)


def free_device_memory(result: dict | None = None) -> None:
    """Drop the engine (its weights, KV pool and CUDA graphs) before HF runs; note what stays allocated."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if result is not None and isinstance(result.get("memory"), dict):
            result["memory"]["allocated_after_engine_freed_bytes"] = torch.cuda.memory_allocated()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "name": platform.processor() or platform.machine(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "hostname": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from pagellm.bench.hf_baseline import transformers_version
    info["transformers"] = transformers_version()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), total_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return info


def measure_peaks(device: torch.device, dtype: torch.dtype, matmul: bool) -> dict:
    """Copy bandwidth (and the matmul rate) before the engine takes the device's memory."""
    peaks = {"copy": measure_copy_bandwidth(device)}
    if matmul:
        peaks["matmul"] = measure_matmul_flops(device, dtype)
    return peaks


class Run:
    """Submit requests, step the engine to completion, keep per-request and per-step timings."""

    def __init__(self, engine, record_kv: bool = True) -> None:
        self.engine = engine
        self.record_kv = record_kv
        self.excluded = 0.0                       # bench bookkeeping kept off the clock
        self.steps: list[StepRecord] = []
        self.submit: dict[str, float] = {}
        self.token_times: dict[str, list[float]] = {}
        self.finish: dict[str, float] = {}
        self.num_output: dict[str, int] = {}
        self.prompt_len: dict[str, int] = {}

    def clock(self) -> float:
        return time.perf_counter() - self.excluded

    def add(self, request_id: str, prompt: list[int], params) -> None:
        self.submit[request_id] = self.clock()
        self.prompt_len[request_id] = len(prompt)
        self.token_times[request_id] = []
        self.engine.add_request(request_id, prompt, params)

    def go(self, max_idle_steps: int = 1000) -> None:
        engine = self.engine
        recorder = StepRecorder(engine)
        synced, idle = True, 0
        try:
            while engine.has_unfinished_requests():
                start = self.clock()
                pipelined = engine.step_in_flight   # [start, end] then spans one device step in steady state
                outputs = engine.step()
                end = self.clock()
                off = time.perf_counter()
                read = recorder.take()   # the steps this call read: its time is theirs (StepRecorder)
                idle = 0 if read or outputs or engine.step_in_flight else idle + 1
                if idle > max_idle_steps:
                    raise RuntimeError("the engine scheduled nothing for many steps with requests pending")
                for out in outputs:   # a step that schedules nothing may still read the one in flight
                    rid = out.request_id
                    if rid not in self.token_times:
                        continue
                    n = len(out.outputs[0].token_ids)
                    times = self.token_times[rid]
                    times.extend([end] * (n - len(times)))
                    if out.finished:
                        self.finish[rid] = end
                        self.num_output[rid] = n
                if not read:
                    continue
                shape = read[-1]
                record = StepRecord(start, end, shape.num_seqs, shape.num_tokens, shape.decode_only, shape.kv_read,
                                    clean=len(read) == 1 and (synced or pipelined))
                if self.record_kv:
                    record.kv_used_blocks, record.kv_allocated_slots, record.kv_holding_slots = kv_occupancy(engine)
                self.steps.append(record)
                # A step that sampled ended with a host sync (the sampler's .tolist()): the device is idle
                # while we do bookkeeping, so that time stays off the clock. Otherwise (no outputs, or the
                # asynchronous pipeline left the next step running) it stays on.
                synced = bool(outputs) and not engine.step_in_flight
                if synced:
                    self.excluded += time.perf_counter() - off
        finally:
            recorder.close()

    # ---- summaries ----
    def request_ids(self) -> list[str]:
        return list(self.submit)

    def ttfts(self) -> list[float]:
        return [self.token_times[r][0] - self.submit[r] for r in self.submit if self.token_times[r]]

    def e2es(self) -> list[float]:
        return [self.finish[r] - self.submit[r] for r in self.submit if r in self.finish]

    def itls(self) -> list[float]:
        return [b - a for r in self.submit for a, b in itertools.pairwise(self.token_times[r])]

    def tpots(self) -> list[float]:
        return [(self.finish[r] - self.token_times[r][0]) / (len(self.token_times[r]) - 1)
                for r in self.submit if r in self.finish and len(self.token_times[r]) > 1]

    def duration(self) -> float:
        return max(self.finish.values()) - min(self.submit.values())


def run_requests(engine, prompts: list[list[int]], params: list, tag: str, record_kv: bool = True) -> Run:
    run = Run(engine, record_kv)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        run.add(f"{tag}-{i}", prompt, p)
    run.go()
    return run


def random_prompts(rng: random.Random, vocab: int, lengths: list[int]) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def engine_summary(engine) -> dict:
    mc = engine.model_config
    return {"name": mc.name, "architecture": mc.architecture, "num_parameters": mc.num_parameters,
            "num_hidden_layers": mc.num_hidden_layers, "hidden_size": mc.hidden_size,
            "intermediate_size": mc.intermediate_size, "num_attention_heads": mc.num_attention_heads,
            "num_key_value_heads": mc.num_key_value_heads, "head_dim": mc.head_dim, "vocab_size": mc.vocab_size,
            "tie_word_embeddings": mc.tie_word_embeddings, "max_model_len": engine.max_model_len}


def runner_info(engine) -> dict:
    runner = engine.runner
    graphs = getattr(runner, "graphs", None)
    return {"attention_backend": runner.backend.name, "dtype": str(runner.dtype).replace("torch.", ""),
            "device": str(runner.device), "cuda_graphs": graphs is not None,
            "cuda_graph_batch_sizes": list(graphs.sizes) if graphs is not None else [],
            "cuda_graph_token_sizes": list(graphs.token_sizes) if graphs is not None else [],
            "cuda_graph_capture_s": graphs.capture_seconds if graphs is not None else None,
            "startup_s": engine.startup_seconds,
            "memory": runner.memory.to_dict()}


def element_size(engine) -> int:
    return torch.tensor([], dtype=engine.runner.dtype).element_size()


def decode_bandwidth_of(engine, steps: list[StepRecord], peaks: dict) -> dict:
    mem = engine.runner.memory
    return decode_bandwidth(steps, engine.model_config, mem.weights_bytes, element_size(engine),
                            mem.kv_bytes_per_token, peaks["copy"]["bandwidth"]).to_json()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_bytes": None, "note": "device memory is only tracked on CUDA"}
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "total_bytes": torch.cuda.get_device_properties(device).total_memory}


def scheduler_stats(engine) -> dict:
    spec = engine.spec_stats
    return asdict(engine.scheduler.stats) | {"prefix_cache_hit_rate": engine.block_manager.stats.hit_rate,
                                             "spec_steps": spec.num_steps, "spec_proposed": spec.num_proposed,
                                             "spec_accepted": spec.num_accepted}


def speculation_rows(sched: dict) -> list[tuple[str, str]]:
    """Report rows of a run's speculative decoding counters (none when nothing was proposed)."""
    if not sched["spec_proposed"]:
        return []
    return [("speculation: acceptance rate", f"{sched['spec_accepted'] / sched['spec_proposed']:.1%}"),
            ("speculation: tokens per verifying step",
             f"{(sched['spec_accepted'] + sched['spec_steps']) / sched['spec_steps']:.2f}")]


def delta(after: dict, before: dict) -> dict:
    return {k: (after[k] - before[k]) if isinstance(after[k], int) else after[k] for k in after}
