"""Measurement helpers for the offline benchmarks: distributions, the per-step
recorder (batch shape, step time, KV occupancy), closed-form FLOPs and bytes,
and the device's own ceilings (copy bandwidth, bf16 matmul rate) measured in
the running process.

Per-step KV occupancy, at the end of every step:

* allocated slots = blocks in use (reference count > 0) x block size;
* holding slots = slots that hold a computed token, each distinct block counted
  once (a prefix block shared by several sequences holds its tokens once);
* waste = 1 - holding / allocated.

A decode-only step reads every weight once (the embedding table only for the
rows it gathers) and the K/V of every cached token of every sequence; its
bandwidth floor is those bytes over the measured device-to-device copy rate
(bytes read + bytes written per second).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


# ---------------------------------------------------------------- distributions

def distribution_ms(values_s: list[float]) -> dict[str, float | int]:
    """Mean, nearest-rank p50/p90/p99, min and max of ``values_s`` (seconds), in ms."""
    if not values_s:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    ordered = sorted(values_s)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    return {"n": len(ordered), "mean": statistics.fmean(ordered) * 1e3, "p50": rank(0.5), "p90": rank(0.9),
            "p99": rank(0.99), "min": ordered[0] * 1e3, "max": ordered[-1] * 1e3}


# ---------------------------------------------------------------- per-step records

@dataclass
class StepRecord:
    start: float                  # bench clock (seconds), before engine.step()
    end: float                    # after it returned
    num_seqs: int
    num_tokens: int               # tokens computed this step
    decode_only: bool             # every scheduled sequence computed exactly its newest token
    kv_tokens_read: int           # decode-only: sum of context lengths (cached + new)
    clean: bool                   # the call read this step alone, and the call before ended synchronised (so
                                  # [start, end] is this step's alone) or left it in flight (the pipeline: the
                                  # previous step's read to this one's, i.e. this step's time on the device)
    kv_used_blocks: int = 0
    kv_allocated_slots: int = 0
    kv_holding_slots: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def kv_waste(self) -> float:
        return 1.0 - self.kv_holding_slots / self.kv_allocated_slots if self.kv_allocated_slots else 0.0


@dataclass(frozen=True)
class StepShape:
    """A scheduled batch as the step records see it (taken when it is scheduled)."""
    num_seqs: int
    num_tokens: int
    decode_only: bool   # every sequence computes exactly its newest token
    kv_read: int        # decode-only: sum of context lengths (cached + new); else 0


class StepRecorder:
    """A step observer (``LLMEngine.add_observer``) that notes each batch's
    shape when it is scheduled and hands out, per ``engine.step()`` call, the
    shapes of the steps whose tokens that call read (``take``); ``close()``
    detaches it.

    A call's time belongs to the step it read, not the one it scheduled: under
    the asynchronous pipeline a call launches step N+1 and then waits for step
    N, so its time is step N's on the device. (Giving it to N+1 gave the first
    decode-only step the last prefill step's time and left the last decode
    step's time out.)"""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.scheduled: dict[int, StepShape] = {}   # id(batch) -> shape, until its tokens are read
        self.read: list[StepShape] = []
        engine.add_observer(self)

    def on_schedule(self, batch) -> None:
        if batch:
            self.scheduled[id(batch)] = step_shape(batch)

    def on_step(self, batch, outputs) -> None:
        self.read.append(self.scheduled.pop(id(batch)))

    def take(self) -> list[StepShape]:
        """The shapes of the steps read since the last call."""
        read, self.read = self.read, []
        return read

    def close(self) -> None:
        self.engine.remove_observer(self)


def step_shape(batch) -> StepShape:
    decode_only = bool(batch.seqs)
    kv_read = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if n != 1 or seq.num_output_tokens == 0 or seq.num_computed_tokens != seq.num_tokens - 1:
            decode_only = False
            break
        kv_read += seq.num_computed_tokens + 1
    return StepShape(len(batch.seqs), batch.num_tokens, decode_only, kv_read if decode_only else 0)


def kv_occupancy(engine) -> tuple[int, int, int]:
    """(blocks in use, allocated slots, slots holding a computed token), distinct blocks once."""
    bm = engine.block_manager
    bs = bm.block_size
    full: set[int] = set()
    partial: dict[int, int] = {}
    for seq in (*engine.scheduler.running, *engine.scheduler.waiting.values()):
        table = seq.block_table
        if not table:
            continue
        computed = min(seq.num_computed_tokens, len(table) * bs)
        num_full = computed // bs
        full.update(b for b in table[:num_full] if b != bm.null_block)   # blocks behind a window are gone
        rest = computed - num_full * bs
        if rest:
            block = table[num_full]
            if partial.get(block, 0) < rest:
                partial[block] = rest
    holding = len(full) * bs + sum(n for b, n in partial.items() if b not in full)
    used = bm.num_used_blocks
    return used, used * bs, holding


def summarize_kv(steps: list[StepRecord], num_blocks: int, block_size: int) -> dict:
    wastes = [s.kv_waste for s in steps if s.kv_allocated_slots]
    usage = [s.kv_used_blocks / num_blocks for s in steps]
    return {
        "num_blocks": num_blocks, "block_size": block_size, "steps_measured": len(steps),
        "waste_max": max(wastes, default=0.0), "waste_mean": statistics.fmean(wastes) if wastes else 0.0,
        "waste_last": wastes[-1] if wastes else 0.0,
        "usage_max": max(usage, default=0.0), "usage_mean": statistics.fmean(usage) if usage else 0.0,
        "peak_used_blocks": max((s.kv_used_blocks for s in steps), default=0),
        "peak_allocated_slots": max((s.kv_allocated_slots for s in steps), default=0),
        "peak_holding_slots": max((s.kv_holding_slots for s in steps), default=0),
    }


# ---------------------------------------------------------------- closed forms

def linear_params_per_token(config) -> int:
    """Weights every token multiplies in the transformer blocks (no embedding, no LM head)."""
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return config.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)


def prefill_flops(config, batch: int, length: int) -> dict[str, float]:
    """FLOPs of a prefill of ``batch`` prompts of ``length`` tokens (a multiply-add is 2):
    block linears on every token, the LM head on the last token of each prompt,
    causal attention ``2*2*layers*heads*head_dim`` per kept query-key pair."""
    tokens = batch * length
    linear = 2 * linear_params_per_token(config) * tokens
    lm_head = 2 * batch * config.hidden_size * config.vocab_size
    pairs = batch * length * (length + 1) // 2
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * pairs
    return {"linear": float(linear), "lm_head": float(lm_head), "attention": float(attention),
            "total": float(linear + lm_head + attention),
            "nominal_2_params_tokens": float(2 * config.num_parameters * tokens + attention)}


def decode_weight_bytes(config, weights_bytes: int, element_size: int, batch: int) -> int:
    """Weight bytes a decode step of ``batch`` sequences reads: all of them, except that an
    untied embedding table is only gathered (``batch`` rows)."""
    if config.tie_word_embeddings:
        return weights_bytes
    table = config.vocab_size * config.hidden_size * element_size
    return weights_bytes - table + batch * config.hidden_size * element_size


@dataclass
class DecodeBandwidth:
    steps: int = 0
    seconds: float = 0.0
    bytes: float = 0.0
    bytes_all_weights: float = 0.0     # counting the whole embedding table too (the floor)
    floor_seconds: float = 0.0
    floor_seconds_all_weights: float = 0.0
    mean_batch: float = 0.0
    step_ms: dict = field(default_factory=dict)
    bandwidth: float | None = None     # measured copy bandwidth used for the floor

    def to_json(self) -> dict:
        d = asdict(self)
        d["achieved_bandwidth"] = self.bytes / self.seconds if self.seconds else None
        d["fraction_of_floor"] = self.floor_seconds / self.seconds if self.seconds and self.bandwidth else None
        d["fraction_of_floor_all_weights"] = (self.floor_seconds_all_weights / self.seconds
                                              if self.seconds and self.bandwidth else None)
        return d


def decode_bandwidth(steps: list[StepRecord], config, weights_bytes: int, element_size: int,
                     kv_bytes_per_token: int, bandwidth: float | None) -> DecodeBandwidth:
    out = DecodeBandwidth(bandwidth=bandwidth)
    chosen = [s for s in steps if s.decode_only and s.clean]
    for s in chosen:
        weights = decode_weight_bytes(config, weights_bytes, element_size, s.num_seqs)
        kv = s.kv_tokens_read * kv_bytes_per_token
        out.bytes += weights + kv
        out.bytes_all_weights += weights_bytes + kv
        out.seconds += s.seconds
    out.steps = len(chosen)
    if chosen:
        out.mean_batch = statistics.fmean(s.num_seqs for s in chosen)
        out.step_ms = distribution_ms([s.seconds for s in chosen])
    if bandwidth:
        out.floor_seconds = out.bytes / bandwidth
        out.floor_seconds_all_weights = out.bytes_all_weights / bandwidth
    return out


# ---------------------------------------------------------------- device ceilings

def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> dict:
    """A large device-to-device copy; bandwidth counts bytes read plus bytes written."""
    if device.type == "cuda":
        nbytes = nbytes or 2**30
        src = torch.rand(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
    else:
        nbytes = nbytes or 64 * 2**20
        src = torch.rand(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    seconds = _median(times)
    return {"bytes": nbytes, "seconds": seconds, "bandwidth": 2 * nbytes / seconds, "method": "median of "
            f"{reps} copies of {nbytes / 2**20:.0f} MiB ({'CUDA events' if device.type == 'cuda' else 'host clock'})"}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> dict | None:
    """An ``n x n x n`` matmul on random data, timed with CUDA events (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    seconds = _median(times)
    return {"shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "flops": 2 * n**3 / seconds, "method": f"median of {reps} torch.mm, CUDA events, random data"}
