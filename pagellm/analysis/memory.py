"""GPU memory calculator, fit solver and quantization advisor.

All figures are **per GPU** (with ``tp`` GPUs each holds 1/tp of the model and
of the KV heads, see ``precision.py``). Notation: ``H`` hidden size, ``L``
layers, ``I`` intermediate size, ``V`` vocabulary, ``hd`` head dim, ``qh`` /
``kvh`` query / KV heads on this GPU, ``I_g`` / ``V_g`` the shares of ``I`` /
``V`` on this GPU, ``a`` activation bytes, ``B`` batch, ``C`` context length.

Weights
    per block: q ``H x qh*hd``, k and v ``H x kvh*hd``, o ``qh*hd x H``,
    gate and up ``H x I_g``, down ``I_g x H`` at the weight width (with
    scales, ``precision.py``); QKV biases (Qwen2) and the two RMSNorm
    vectors at the base width. Plus the embedding ``V_g x H``, the final norm
    ``H`` and, unless tied to the embedding, the LM head ``V_g x H``, all at
    the base width. With TP = 1 and 16 bits this is ``2 * num_parameters``:
    Llama-2-7B = 13.48 GB.

KV cache
    per token ``2 * L * kvh * kv_vector_bytes`` (K and V), i.e.
    ``2 * L * kvh * hd * kv_bits / 8`` for 8 and 16 bits; Llama-2-7B fp16:
    512 KiB, Llama-3-8B (8 KV heads): 128 KiB. A sequence of context ``C``
    stores ``min(C, sliding_window)`` tokens (older ones fall out of the
    window and their pages are freed), rounded up to whole pages of
    ``block_size`` tokens. Total ``B x`` that.

Activations (peak of one prefill chunk of ``T = min(prefill_chunk, B*C)``
tokens; inference keeps no activations across layers)
    residual stream ``T*H*a`` live throughout, plus the larger of
    attention phase ``T*(H + 2*qh*hd + 2*kvh*hd)*a`` (normed input, Q, K, V,
    attention output) and MLP phase ``T*(H + 3*I_g)*a`` (normed input, gate,
    up, their product), plus the FP32 logits of the ``B`` sampled rows
    ``B*V*4``. Without FlashAttention the score matrix
    ``qh*T*min(C, window)*a`` joins the attention phase.

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
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from pagellm.analysis.precision import Precision, Shard, shard
from pagellm.model.config import ModelConfig

GiB = 2**30
DEFAULT_WORKSPACE = 1 * GiB
DEFAULT_BLOCK_SIZE = 16
DEFAULT_PREFILL_CHUNK = 2048
LOGIT_BYTES = 4  # logits are upcast to fp32 for sampling


# ---------------------------------------------------------------- components

def weights_bytes(config: ModelConfig, precision: Precision = Precision(), tp: int = 1) -> float:
    """Bytes of weights on one GPU."""
    s = shard(config, tp)
    return block_weight_bytes(config, precision, s) * config.num_hidden_layers + _outside_block_weight_bytes(
        config, precision, s)


def block_weight_bytes(config: ModelConfig, precision: Precision, s: Shard) -> float:
    """Bytes of one transformer block's weights on one GPU."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = s.q_heads * hd, s.kv_heads * hd
    lw = precision.linear_weight_bytes
    linears = lw(h, q) + 2 * lw(h, kv) + lw(q, h) + 2 * lw(h, s.intermediate) + lw(s.intermediate, h)
    bias = (q + 2 * kv) if config.attention_bias else 0
    return linears + (bias + 2 * h) * precision.base_bytes


def _outside_block_weight_bytes(config: ModelConfig, precision: Precision, s: Shard) -> float:
    h = config.hidden_size
    table = s.vocab * h
    lm_head = 0 if config.tie_word_embeddings else table
    return (table + lm_head + h) * precision.base_bytes


def kv_bytes_per_token(config: ModelConfig, precision: Precision = Precision(), tp: int = 1) -> float:
    """K and V bytes one token adds to the cache on one GPU, all layers."""
    s = shard(config, tp)
    return 2 * config.num_hidden_layers * s.kv_heads * precision.kv_vector_bytes(config.head_dim)


def kv_tokens_per_sequence(config: ModelConfig, context_len: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Tokens a sequence of ``context_len`` keeps in the cache: window-capped, page-rounded."""
    kept = min(context_len, config.sliding_window) if config.sliding_window else context_len
    if block_size > 1:
        kept = math.ceil(kept / block_size) * block_size
    return kept


def activation_bytes(config: ModelConfig, precision: Precision, tokens: int, batch_size: int,
                     context_len: int, tp: int = 1, flash_attention: bool = True) -> float:
    """Peak activation bytes on one GPU while a chunk of ``tokens`` goes through a block."""
    s = shard(config, tp)
    h, hd, a = config.hidden_size, config.head_dim, precision.a_bytes
    residual = tokens * h * a
    attn = tokens * (h + 2 * s.q_heads * hd + 2 * s.kv_heads * hd) * a
    if not flash_attention:
        keys = min(context_len, config.sliding_window or context_len)
        attn += s.q_heads * tokens * keys * a
    mlp = tokens * (h + 3 * s.intermediate) * a
    logits = batch_size * config.vocab_size * LOGIT_BYTES
    return residual + max(attn, mlp) + logits


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

    @property
    def total_bytes(self) -> float:
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
                     flash_attention: bool = True) -> MemoryBreakdown:
    """Per-GPU memory to serve ``batch_size`` sequences of up to ``context_len`` tokens."""
    if batch_size < 1 or context_len < 1:
        raise ValueError("batch size and context length must be at least 1")
    if prefill_chunk < 1:
        raise ValueError("prefill chunk must be at least 1 token")
    per_token = kv_bytes_per_token(config, precision, tp)
    kept = kv_tokens_per_sequence(config, context_len, block_size)
    chunk = min(prefill_chunk, batch_size * context_len)
    return MemoryBreakdown(
        weights_bytes=weights_bytes(config, precision, tp),
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
