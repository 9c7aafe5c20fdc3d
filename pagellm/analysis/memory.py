"""GPU memory calculator, fit solver and quantization advisor.

All figures are **per GPU**. The components (weights, KV cache, activations)
come from :mod:`pagellm.sizing`, whose docstring gives their formulas; the
engine sizes its own pool from the same module, so prediction and engine
cannot drift apart. The total adds:

Workspace
    a fixed allowance (default 1 GiB) for the CUDA context, cuBLAS
    workspaces and allocator slack that ``torch.cuda.memory_allocated``
    never shows but ``nvidia-smi`` does. Override with ``--workspace``.

Fit questions (``fit``) are answered by bisection on the monotone total
above, so page rounding, windows and logits are all respected: the largest
context at the given batch (reported both as memory allows it and capped by
the model's ``max_position_embeddings``) and the largest batch at the given
context. They assume a full prefill chunk of activations in flight.

Advisor (``advise``): tries every weight width (16/8/4), KV width (16/8/4)
and maximum length (the requested one, then halved up to three times, not
below 256) and keeps those whose worst-case concurrency (every user at the
maximum length) reaches the target. "Cheapest" means least quality given
up, by a fixed penalty: W8 = 1, W4 = 3, KV8 = 1, KV4 = 4, each halving of
the maximum length = 5 (shortening what users can send is the last resort);
ties go to the option that serves more users. All candidates are returned so
callers can show the trade-off.

Offload advisor (``advise_offload``): for each weight width (16/8/4, at the
given KV width and length), the fewest decoder layers to stream from host
memory (``sizing.offloaded_layers``: ``k`` layers save ``k - 2``, two buffers
stay on the GPU) so ``target_concurrency`` sequences fit. Streamed weights
cross the host link on every step, so once something must be offloaded the
recommendation is the option that offloads the fewest bytes (ties: the
wider weights); with nothing to offload it is the widest weights that fit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from pagellm.model.config import ModelConfig
from pagellm.sizing import (DEFAULT_BLOCK_SIZE, Precision, activation_bytes, block_weight_bytes,
                            kv_bytes_per_token, kv_tokens_per_sequence, offload_split, offloaded_layers, shard,
                            weights_bytes)

GiB = 2**30
DEFAULT_WORKSPACE = 1 * GiB
DEFAULT_PREFILL_CHUNK = 2048


# ---------------------------------------------------------------- breakdown

@dataclass(frozen=True)
class MemoryBreakdown:
    weights_bytes: float
    kv_bytes: float
    kv_bytes_per_token: float
    activation_bytes: float
    workspace_bytes: float
    batch_size: int
    context_len: int
    kv_tokens_per_sequence: int
    tp: int
    precision: Precision
    host_weights_bytes: float = 0.0   # decoder layers streamed from host memory (weights_bytes: on the GPU)
    offloaded_layers: int = 0
    host_kv_bytes: float = 0.0        # the host KV pool (swap space), whole blocks

    @property
    def total_bytes(self) -> float:
        """On the GPU (the host tiers are not in it)."""
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes

    def to_json(self) -> dict:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "activation_bytes": self.activation_bytes,
            "workspace_bytes": self.workspace_bytes,
            "total_bytes": self.total_bytes,
            "per_gpu": True,
            "tp": self.tp,
            "total_all_gpus_bytes": self.total_bytes * self.tp,
            "batch_size": self.batch_size,
            "context_len": self.context_len,
            "kv_tokens_per_sequence": self.kv_tokens_per_sequence,
            "precision": asdict(self.precision),
            "host_weights_bytes": self.host_weights_bytes,
            "offloaded_layers": self.offloaded_layers,
            "host_kv_bytes": self.host_kv_bytes,
        }


@dataclass(frozen=True)
class MemoryOptions:
    """Knobs shared by the breakdown, the fit solver and the advisor."""
    tp: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    workspace_bytes: float = DEFAULT_WORKSPACE
    flash_attention: bool = True


def memory_breakdown(config: ModelConfig, batch_size: int, context_len: int,
                     precision: Precision = Precision(), tp: int = 1,
                     block_size: int = DEFAULT_BLOCK_SIZE, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                     workspace_bytes: float = DEFAULT_WORKSPACE,
                     flash_attention: bool = True, offload_bytes: float = 0, swap_bytes: float = 0
                     ) -> MemoryBreakdown:
    """Per-GPU memory to serve ``batch_size`` sequences of up to ``context_len`` tokens, with
    ``offload_bytes`` of decoder layers streamed from the host (whole layers, as the engine's
    ``cpu_offload_memory``) and a host KV pool of ``swap_bytes`` (the engine's ``swap_space``)."""
    if batch_size < 1 or context_len < 1:
        raise ValueError("batch size and context length must be at least 1")
    if prefill_chunk < 1:
        raise ValueError("prefill chunk must be at least 1 token")
    per_token = kv_bytes_per_token(config, precision, tp)
    kept = kv_tokens_per_sequence(config, context_len, block_size)
    chunk = min(prefill_chunk, batch_size * context_len)
    layer = block_weight_bytes(config, precision, shard(config, tp))
    offloaded = min(config.num_hidden_layers, math.ceil(offload_bytes / layer))
    device_weights, host_weights = offload_split(weights_bytes(config, precision, tp), layer, offloaded)
    per_block = per_token * block_size
    return MemoryBreakdown(
        weights_bytes=device_weights, host_weights_bytes=host_weights, offloaded_layers=offloaded,
        host_kv_bytes=swap_bytes // per_block * per_block,
        kv_bytes=batch_size * kept * per_token,
        kv_bytes_per_token=per_token,
        activation_bytes=activation_bytes(config, precision, chunk, batch_size, context_len, tp, flash_attention),
        workspace_bytes=workspace_bytes,
        batch_size=batch_size, context_len=context_len, kv_tokens_per_sequence=kept, tp=tp,
        precision=precision,
    )


def _total(config: ModelConfig, batch: int, context: int, precision: Precision, opts: MemoryOptions) -> float:
    # Fit questions assume a full prefill chunk in flight (the worst case).
    b = memory_breakdown(config, batch, context, precision, opts.tp, opts.block_size, opts.prefill_chunk,
                         opts.workspace_bytes, opts.flash_attention)
    full_chunk = activation_bytes(config, precision, opts.prefill_chunk, batch, context, opts.tp,
                                  opts.flash_attention)
    return b.total_bytes - b.activation_bytes + full_chunk


# ---------------------------------------------------------------- fit

@dataclass(frozen=True)
class FitReport:
    memory_bytes: float           # per GPU
    requested_total_bytes: float
    fits: bool
    free_bytes: float
    max_context: int              # usable at the requested batch: min(memory limit, model positions)
    max_context_limited_by: str   # "memory" or "model"
    max_context_by_memory: int | None  # memory alone; None = unbounded (sliding window)
    model_max_context: int        # max_position_embeddings
    max_batch: int                # at the requested context

    def to_json(self) -> dict:
        return asdict(self)


def _largest(ok, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone (True then False); lo-1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


CONTEXT_SEARCH_CAP = 1 << 24


def max_context(config: ModelConfig, memory_bytes: float, batch_size: int,
                precision: Precision = Precision(), opts: MemoryOptions = MemoryOptions()) -> int | None:
    """Largest context memory allows each of ``batch_size`` sequences.

    0 when not even one token fits; None when memory never runs out (a
    sliding window caps the cache). The model's own position limit is not
    applied here (see ``fit``).
    """
    def ok(c: int) -> bool:
        return _total(config, batch_size, c, precision, opts) <= memory_bytes
    if ok(CONTEXT_SEARCH_CAP):
        return None
    return max(_largest(ok, 1, CONTEXT_SEARCH_CAP), 0)


def max_batch(config: ModelConfig, memory_bytes: float, context_len: int,
              precision: Precision = Precision(), opts: MemoryOptions = MemoryOptions()) -> int:
    """Largest number of sequences of ``context_len`` tokens that fit at once."""
    def ok(b: int) -> bool:
        return _total(config, b, context_len, precision, opts) <= memory_bytes
    hi = 1
    while ok(hi) and hi < 1 << 40:
        hi *= 2
    return max(_largest(ok, 1, hi), 0)


def fit(config: ModelConfig, memory_bytes: float, batch_size: int, context_len: int,
        precision: Precision = Precision(), opts: MemoryOptions = MemoryOptions()) -> FitReport:
    if memory_bytes <= 0:
        raise ValueError("GPU memory must be positive")
    total = _total(config, batch_size, context_len, precision, opts)
    by_memory = max_context(config, memory_bytes, batch_size, precision, opts)
    model_max = config.max_position_embeddings
    usable = model_max if by_memory is None else min(by_memory, model_max)
    return FitReport(memory_bytes=memory_bytes, requested_total_bytes=total, fits=total <= memory_bytes,
                     free_bytes=memory_bytes - total, max_context=usable,
                     max_context_limited_by="model" if usable == model_max else "memory",
                     max_context_by_memory=by_memory, model_max_context=model_max,
                     max_batch=max_batch(config, memory_bytes, context_len, precision, opts))


# ---------------------------------------------------------------- advisor

W_PENALTY = {32: 0, 16: 0, 8: 1, 4: 3}
KV_PENALTY = {32: 0, 16: 0, 8: 1, 4: 4}
HALVING_PENALTY = 5
MIN_ADVISED_LEN = 256


@dataclass(frozen=True)
class AdviceOption:
    w_bits: int
    kv_bits: int
    max_len: int
    concurrency: int          # sequences of max_len that fit at once
    penalty: int
    weights_bytes: float
    kv_bytes_per_token: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Advice:
    target_concurrency: int
    context_len: int
    recommended: AdviceOption | None
    options: list[AdviceOption] = field(default_factory=list)  # all tried, best first

    @property
    def reaching(self) -> list[AdviceOption]:
        return [o for o in self.options if o.concurrency >= self.target_concurrency]

    def to_json(self) -> dict:
        return {"target_concurrency": self.target_concurrency, "context_len": self.context_len,
                "recommended": self.recommended.to_json() if self.recommended else None,
                "options": [o.to_json() for o in self.options]}


def _lengths(context_len: int) -> list[int]:
    out = [context_len]
    while len(out) < 4 and out[-1] // 2 >= MIN_ADVISED_LEN:
        out.append(out[-1] // 2)
    return out


def advise(config: ModelConfig, memory_bytes: float, target_concurrency: int, context_len: int,
           precision: Precision = Precision(), opts: MemoryOptions = MemoryOptions()) -> Advice:
    """Cheapest (weight bits, KV bits, max length) serving ``target_concurrency`` users."""
    if target_concurrency < 1:
        raise ValueError("target concurrency must be at least 1")
    w_choices = [w for w in (precision.w_bits, 16, 8, 4) if w <= precision.w_bits]
    kv_choices = [k for k in (precision.kv_bits, 16, 8, 4) if k <= precision.kv_bits]
    options = []
    for halvings, length in enumerate(_lengths(context_len)):
        for w in dict.fromkeys(w_choices):
            for kv in dict.fromkeys(kv_choices):
                p = replace(precision, w_bits=w, kv_bits=kv)
                options.append(AdviceOption(
                    w_bits=w, kv_bits=kv, max_len=length,
                    concurrency=max_batch(config, memory_bytes, length, p, opts),
                    penalty=W_PENALTY[w] + KV_PENALTY[kv] + HALVING_PENALTY * halvings,
                    weights_bytes=weights_bytes(config, p, opts.tp),
                    kv_bytes_per_token=kv_bytes_per_token(config, p, opts.tp)))
    options.sort(key=lambda o: (o.concurrency < target_concurrency, o.penalty, -o.concurrency))
    best = options[0] if options[0].concurrency >= target_concurrency else None
    return Advice(target_concurrency=target_concurrency, context_len=context_len, recommended=best,
                  options=options)


# ---------------------------------------------------------------- offload advisor

@dataclass(frozen=True)
class OffloadOption:
    w_bits: int
    offloaded_layers: int | None    # None: does not fit even with every layer offloaded
    device_weights_bytes: float
    host_weights_bytes: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OffloadAdvice:
    target_concurrency: int
    context_len: int
    recommended: OffloadOption | None
    options: list[OffloadOption] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"target_concurrency": self.target_concurrency, "context_len": self.context_len,
                "recommended": self.recommended.to_json() if self.recommended else None,
                "options": [o.to_json() for o in self.options]}


def advise_offload(config: ModelConfig, memory_bytes: float, target_concurrency: int, context_len: int,
                   precision: Precision = Precision(), opts: MemoryOptions = MemoryOptions()) -> OffloadAdvice:
    """Per weight width, the decoder layers to stream from host memory so that
    ``target_concurrency`` sequences of ``context_len`` fit (module docstring)."""
    options = []
    for w in dict.fromkeys(w for w in (precision.w_bits, 16, 8, 4) if w <= precision.w_bits):
        p = replace(precision, w_bits=w)
        weights = weights_bytes(config, p, opts.tp)
        others = _total(config, target_concurrency, context_len, p, opts) - weights
        layer = block_weight_bytes(config, p, shard(config, opts.tp))
        k = offloaded_layers(weights, layer, config.num_hidden_layers, memory_bytes - others)
        device, host = offload_split(weights, layer, k) if k is not None else (weights, 0.0)
        options.append(OffloadOption(w, k, device, host))
    fitting = [o for o in options if o.offloaded_layers is not None]
    best = min(fitting, key=lambda o: (o.host_weights_bytes, -o.w_bits), default=None)
    return OffloadAdvice(target_concurrency, context_len, best, options)
