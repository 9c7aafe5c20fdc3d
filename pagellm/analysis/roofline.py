"""Per-layer roofline of a decoder-only transformer: prefill and one decode step.

For every kernel of one transformer block, plus the embedding, the final norm
and the LM head, we count the operations (a multiply-add is 2 OPs), the bytes
it moves to and from GPU memory (weights, activations and KV cache apart),
its arithmetic intensity ``OPs / bytes`` and its roofline time on one GPU::

    time = max(OPs / peak, bytes / bandwidth)   (+ all-reduce time with TP)

The bound is "compute" when the first term wins, otherwise "memory"; the
all-reduce rows of tensor parallelism are "comm". Stage time is the sum over
kernels (no overlap between kernels, no launch gaps, datasheet peaks): a
lower bound, which measured kernels reach only to the extent they attain
the peak FLOP/s and bandwidth.

Notation
--------
``B`` batch, ``n`` new tokens per sequence this step (the prompt length ``s``
in prefill, 1 in decode), ``c`` tokens already cached (0 in prefill, ``L`` in
decode), ``T = B*n``. Per GPU: ``qh``/``kvh`` query/KV heads, ``q = qh*hd``,
``kv = kvh*hd``, ``I_g`` intermediate share, ``V_g`` vocabulary share, ``H``
hidden size (full on every GPU). ``a`` activation bytes, ``e`` bytes of one
head-token K or V vector in the cache (``precision.py``), ``W(i, o)`` the
bytes of an ``i -> o`` weight matrix (scales included), ``base`` the bytes of
unquantized tensors. ``win`` is the sliding window (infinite if none).

Keys: query ``i`` (absolute position ``c+i``) sees ``min(c+i+1, win)`` keys.
``P = sum_i min(c+i+1, win)`` is the number of query-key pairs the causal
(and window) mask keeps: ``s(s+1)/2`` for a prefill of ``s`` tokens, ``L+1``
for a decode step after ``L`` cached tokens (the new token sees itself).
``K_u = c + n - max(0, c - win + 1)`` keys are read once per sequence.
Unfused attention computes a dense ``n x K_d`` block, ``K_d = min(c+n,
win+n-1)``: the full ``s x s`` square in prefill.

Per block (each row: OPs; weight / activation / KV bytes)
--------------------------------------------------------
* attn_norm, mlp_norm (RMSNorm): ``4*T*H``; ``H*base``; ``2*T*H*a``
* q_proj: ``2*T*H*q`` (+ ``T*q`` bias); ``W(H,q)`` (+ ``q*base``); ``T*(H+q)*a``
* k_proj, v_proj: same with ``kv``
* rope (Q and K): ``3*T*(q+kv)``; -; ``2*T*(q+kv)*a``
* kv_cache_store: 0 OPs (``4*T*kv`` to quantize below 16 bits); ``2*T*kv*a``
  read; ``2*B*n*kvh*e`` written to the cache
* with FlashAttention, one fused ``flash_attention`` row:
  ``B*qh*P*(4*hd + 5)`` (QK^T and PV 2*hd each per pair, ~5 for the online
  softmax); Q read and O written ``2*T*q*a``; K and V read once,
  ``2*B*K_u*kvh*e``
* without it: ``qk_matmul`` ``2*B*qh*n*K_d*hd`` (reads Q and K ``B*K_d*kvh*e``,
  writes the scores ``B*qh*n*K_d*a``), ``softmax`` ``5*B*qh*n*K_d`` (reads
  and writes the scores), ``sv_matmul`` ``2*B*qh*n*K_d*hd`` (reads scores and
  V, writes ``T*q*a``)
* o_proj: ``2*T*q*H``; ``W(q,H)``; ``T*(q+H)*a``
* attn_add, mlp_add (residual): ``T*H``; -; ``3*T*H*a``
* gate_proj, up_proj: ``2*T*H*I_g``; ``W(H,I_g)``; ``T*(H+I_g)*a``
* act_mul (SiLU(gate) * up): ``5*T*I_g``; -; ``3*T*I_g*a``
* down_proj: ``2*T*I_g*H``; ``W(I_g,H)``; ``T*(I_g+H)*a``
* attn_all_reduce, mlp_all_reduce (TP > 1 only): ring all-reduce of ``T*H*a``
  bytes, time ``2*(tp-1)/tp * T*H*a / link_bandwidth``

Outside the blocks
------------------
* embedding: gathers ``T`` rows: ``T*H*base/tp`` weight bytes (the rows of
  this GPU's vocabulary shard), ``T*H*a`` written; all-reduced with TP
* final_norm: as attn_norm
* lm_head: logits of the last position of each sequence only (``B`` rows,
  what a serving engine samples from): ``2*B*H*V_g``; ``V_g*H*base``;
  ``B*(H+V_g)*a``

Peaks: linear layers run at the activation width (W4A16 dequantizes to FP16,
W8A8 uses INT8 tensor cores), attention at 8 bits only when both activations
and KV are 8-bit, element-wise kernels on the FP32 vector units.

End to end (``EndToEnd``): ``TTFT`` = prefill time of the batch; then
``N-1`` decode steps at ``L = s, s+1, ..., s+N-2`` cached tokens (the first
token comes out of the prefill). ``TPOT`` is their mean, evaluated exactly
up to 512 steps and by trapezoidal integration over 257 points beyond.

Deliberate differences from LLM-Viewer
--------------------------------------
* Causal masking: with FlashAttention we count the ``s(s+1)/2`` pairs the
  kernel computes (it skips fully masked tiles), not the full ``s*s``
  square LLM-Viewer counts, which doubles prefill attention OPs. Unfused
  attention still gets the full square, because it computes it.
* GQA: K/V traffic counts each KV head once per sequence, as GQA kernels
  read it; counting per query head would overstate decode attention
  traffic by ``heads / kv_heads`` (4x for Llama-3-8B, 8x for Llama-3-70B).
* Sliding windows cap both the keys attended and the KV bytes read (Mistral).
* Quantized weights include their FP16 group scales; LLM-Viewer multiplies
  the element count by ``bits / 8`` only, which understates W4 g128 by 3 %.
  Embeddings and the LM head stay 16-bit, as quantized checkpoints ship them.
* FlashAttention memory is the compulsory traffic (Q, K, V read once, O
  written once); LLM-Viewer adds K/V re-reads derived from an on-chip buffer
  size. On H100-class parts those re-reads mostly hit L2.
* A decode step sees ``L + 1`` keys (the cache plus the new token).
* The LM head runs on ``B`` rows in prefill, not ``B*s``.
* Tensor parallelism: per-GPU shards and all-reduce rows; LLM-Viewer models
  one device.
* Element-wise kernels are timed against the vector (FP32) peak rather than
  the tensor-core peak; it changes nothing in practice (they are memory
  bound) but keeps points honest on the plot.
* RoPE and the KV-cache write are their own rows; norms, residual adds and
  RoPE are counted unfused (engines that fuse them save some activation
  traffic, which matters only for small models at long prompts).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pagellm.analysis.hardware import Hardware
from pagellm.analysis.memory import MemoryBreakdown, memory_breakdown
from pagellm.sizing import Precision, Shard, shard
from pagellm.model.config import ModelConfig

VECTOR = 0          # peak_bits marker: element-wise kernel on the FP32 vector units
EXACT_STEPS = 512   # decode steps evaluated one by one before switching to integration
SAMPLE_POINTS = 257


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str                   # "norm" | "linear" | "attention" | "elementwise" | "memory" | "comm"
    ops: float = 0.0
    weight_bytes: float = 0.0
    act_read_bytes: float = 0.0
    act_write_bytes: float = 0.0
    kv_read_bytes: float = 0.0
    kv_write_bytes: float = 0.0
    comm_bytes: float = 0.0     # all-reduce message size
    peak_bits: int = 16         # matmul input width; VECTOR for element-wise

    @property
    def act_bytes(self) -> float:
        return self.act_read_bytes + self.act_write_bytes

    @property
    def kv_bytes(self) -> float:
        return self.kv_read_bytes + self.kv_write_bytes

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes


@dataclass(frozen=True)
class LayerRow:
    cost: LayerCost
    peak: float                 # OP/s this kernel is timed against
    compute_time_s: float
    memory_time_s: float
    comm_time_s: float
    time_s: float
    bound: str                  # "compute" | "memory" | "comm"

    @property
    def name(self) -> str:
        return self.cost.name

    @property
    def ops(self) -> float:
        return self.cost.ops

    @property
    def bytes(self) -> float:
        return self.cost.bytes

    @property
    def intensity(self) -> float | None:
        return self.cost.ops / self.cost.bytes if self.cost.bytes else None

    def to_json(self) -> dict:
        c = self.cost
        return {
            "name": c.name, "kind": c.kind, "ops": c.ops, "bytes": c.bytes,
            "weight_bytes": c.weight_bytes, "act_bytes": c.act_bytes, "kv_bytes": c.kv_bytes,
            "act_read_bytes": c.act_read_bytes, "act_write_bytes": c.act_write_bytes,
            "kv_read_bytes": c.kv_read_bytes, "kv_write_bytes": c.kv_write_bytes,
            "comm_bytes": c.comm_bytes, "intensity": self.intensity, "bound": self.bound,
            "time_s": self.time_s, "compute_time_s": self.compute_time_s,
            "memory_time_s": self.memory_time_s, "comm_time_s": self.comm_time_s,
        }


def evaluate(cost: LayerCost, hw: Hardware, tp: int = 1) -> LayerRow:
    """Roofline time of one kernel on ``hw``."""
    peak = hw.fp32_flops if cost.peak_bits == VECTOR else hw.matmul_peak(cost.peak_bits)
    compute = cost.ops / peak
    memory = cost.bytes / hw.bandwidth
    comm = 0.0
    if cost.comm_bytes and tp > 1 and hw.link_bandwidth:
        comm = 2 * (tp - 1) / tp * cost.comm_bytes / hw.link_bandwidth
    if cost.kind == "comm":
        bound = "comm"
    else:
        bound = "compute" if compute > memory else "memory"
    return LayerRow(cost=cost, peak=peak, compute_time_s=compute, memory_time_s=memory,
                    comm_time_s=comm, time_s=max(compute, memory) + comm, bound=bound)


# ---------------------------------------------------------------- counting

@dataclass(frozen=True)
class Step:
    """What one forward pass processes: ``batch`` sequences, ``new`` tokens each, ``cached`` before."""
    batch: int
    new: int
    cached: int
    window: int | None

    @property
    def tokens(self) -> int:
        return self.batch * self.new

    def _f(self, x: int) -> int:  # sum_{j=1..x} min(j, win)
        w = self.window
        if w is None or x <= w:
            return x * (x + 1) // 2
        return w * (w + 1) // 2 + (x - w) * w

    @property
    def pairs(self) -> int:
        """Query-key pairs per sequence and head kept by the causal/window mask."""
        return self._f(self.cached + self.new) - self._f(self.cached)

    @property
    def unique_keys(self) -> int:
        c, n, w = self.cached, self.new, self.window
        return c + n - (max(0, c - w + 1) if w else 0)

    @property
    def dense_keys(self) -> int:
        c, n, w = self.cached, self.new, self.window
        return min(c + n, w + n - 1) if w else c + n


def _linear_bits(p: Precision) -> int:
    return p.a_bits if p.w_bits <= max(p.a_bits, 8) else max(p.a_bits, p.w_bits)


def _attention_bits(p: Precision) -> int:
    return 8 if p.a_bits <= 8 and p.kv_bits <= 8 else max(p.a_bits, 16)


def _norm(name: str, tokens: int, h: int, p: Precision) -> LayerCost:
    return LayerCost(name, "norm", ops=4 * tokens * h, weight_bytes=h * p.base_bytes,
                     act_read_bytes=tokens * h * p.a_bytes, act_write_bytes=tokens * h * p.a_bytes,
                     peak_bits=VECTOR)


def _linear(name: str, tokens: int, in_f: int, out_f: int, p: Precision, bias: bool = False) -> LayerCost:
    ops = 2 * tokens * in_f * out_f + (tokens * out_f if bias else 0)
    weights = p.linear_weight_bytes(in_f, out_f) + (out_f * p.base_bytes if bias else 0)
    return LayerCost(name, "linear", ops=ops, weight_bytes=weights,
                     act_read_bytes=tokens * in_f * p.a_bytes, act_write_bytes=tokens * out_f * p.a_bytes,
                     peak_bits=_linear_bits(p))


def _elementwise(name: str, ops_per: int, elements: int, reads: int, p: Precision) -> LayerCost:
    return LayerCost(name, "elementwise", ops=ops_per * elements, act_read_bytes=reads * elements * p.a_bytes,
                     act_write_bytes=elements * p.a_bytes, peak_bits=VECTOR)


def _all_reduce(name: str, tokens: int, h: int, p: Precision) -> LayerCost:
    return LayerCost(name, "comm", comm_bytes=tokens * h * p.a_bytes)


def _attention(step: Step, s: Shard, hd: int, p: Precision, flash: bool) -> list[LayerCost]:
    a, e = p.a_bytes, p.kv_vector_bytes(hd)
    b, n, q = step.batch, step.new, s.q_heads * hd
    bits = _attention_bits(p)
    if flash:
        return [LayerCost("flash_attention", "attention", ops=b * s.q_heads * step.pairs * (4 * hd + 5),
                          act_read_bytes=b * n * q * a, act_write_bytes=b * n * q * a,
                          kv_read_bytes=2 * b * step.unique_keys * s.kv_heads * e, peak_bits=bits)]
    k = step.dense_keys
    scores = b * s.q_heads * n * k
    return [
        LayerCost("qk_matmul", "attention", ops=2 * scores * hd, act_read_bytes=b * n * q * a,
                  kv_read_bytes=b * k * s.kv_heads * e, act_write_bytes=scores * a, peak_bits=bits),
        LayerCost("softmax", "elementwise", ops=5 * scores, act_read_bytes=scores * a,
                  act_write_bytes=scores * a, peak_bits=VECTOR),
        LayerCost("sv_matmul", "attention", ops=2 * scores * hd, act_read_bytes=scores * a,
                  kv_read_bytes=b * k * s.kv_heads * e, act_write_bytes=b * n * q * a, peak_bits=bits),
    ]


def block_costs(config: ModelConfig, p: Precision, step: Step, s: Shard, flash: bool) -> list[LayerCost]:
    """Kernels of one transformer block on one GPU."""
    h, hd, t = config.hidden_size, config.head_dim, step.tokens
    q, kv, i = s.q_heads * hd, s.kv_heads * hd, s.intermediate
    bias = config.attention_bias
    e = p.kv_vector_bytes(hd)
    rows = [
        _norm("attn_norm", t, h, p),
        _linear("q_proj", t, h, q, p, bias),
        _linear("k_proj", t, h, kv, p, bias),
        _linear("v_proj", t, h, kv, p, bias),
        LayerCost("rope", "elementwise", ops=3 * t * (q + kv), act_read_bytes=t * (q + kv) * p.a_bytes,
                  act_write_bytes=t * (q + kv) * p.a_bytes, peak_bits=VECTOR),
        LayerCost("kv_cache_store", "memory", ops=4 * t * kv if p.kv_bits < 16 else 0,
                  act_read_bytes=2 * t * kv * p.a_bytes, kv_write_bytes=2 * t * s.kv_heads * e,
                  peak_bits=VECTOR),
        *_attention(step, s, hd, p, flash),
        _linear("o_proj", t, q, h, p),
    ]
    if s.tp > 1:
        rows.append(_all_reduce("attn_all_reduce", t, h, p))
    rows += [
        _elementwise("attn_add", 1, t * h, 2, p),
        _norm("mlp_norm", t, h, p),
        _linear("gate_proj", t, h, i, p),
        _linear("up_proj", t, h, i, p),
        _elementwise("act_mul", 5, t * i, 2, p),
        _linear("down_proj", t, i, h, p),
    ]
    if s.tp > 1:
        rows.append(_all_reduce("mlp_all_reduce", t, h, p))
    rows.append(_elementwise("mlp_add", 1, t * h, 2, p))
    return rows


def outside_block_costs(config: ModelConfig, p: Precision, step: Step, s: Shard) -> list[LayerCost]:
    """Embedding, final norm and LM head on one GPU."""
    h, t, b, a = config.hidden_size, step.tokens, step.batch, p.a_bytes
    rows = [LayerCost("embedding", "memory", weight_bytes=t * h * p.base_bytes / s.tp,
                      act_write_bytes=t * h * a, peak_bits=VECTOR)]
    if s.tp > 1:
        rows.append(_all_reduce("embedding_all_reduce", t, h, p))
    rows.append(_norm("final_norm", t, h, p))
    rows.append(LayerCost("lm_head", "linear", ops=2 * b * h * s.vocab, weight_bytes=s.vocab * h * p.base_bytes,
                          act_read_bytes=b * h * a, act_write_bytes=b * s.vocab * a,
                          peak_bits=max(p.a_bits, 16)))
    return rows


# ---------------------------------------------------------------- reports

@dataclass(frozen=True)
class StageReport:
    stage: str                    # "prefill" or "decode"
    batch_size: int
    new_tokens: int               # per sequence
    cached_tokens: int            # per sequence, before this step
    num_blocks: int
    layers: list[LayerRow]        # one block
    outside: list[LayerRow]       # embedding, final norm, LM head

    def _sum(self, attr: str) -> float:
        """Whole-model total of a row field: every block plus the rows outside the blocks."""
        def value(r: LayerRow) -> float:
            return getattr(r.cost, attr) if hasattr(r.cost, attr) else getattr(r, attr)
        return self.num_blocks * sum(map(value, self.layers)) + sum(map(value, self.outside))

    @property
    def ops(self) -> float:
        return self._sum("ops")

    @property
    def bytes(self) -> float:
        return self._sum("bytes")

    @property
    def time_s(self) -> float:
        return self._sum("time_s")

    def total_json(self) -> dict:
        return {
            "ops": self.ops, "bytes": self.bytes, "time_s": self.time_s,
            "weight_bytes": self._sum("weight_bytes"), "act_bytes": self._sum("act_bytes"),
            "kv_bytes": self._sum("kv_bytes"), "comm_bytes": self._sum("comm_bytes"),
            "compute_time_s": self._sum("compute_time_s"), "memory_time_s": self._sum("memory_time_s"),
            "comm_time_s": self._sum("comm_time_s"),
            "intensity": self.ops / self.bytes if self.bytes else None,
        }

    def to_json(self) -> dict:
        return {
            "batch_size": self.batch_size, "new_tokens": self.new_tokens, "cached_tokens": self.cached_tokens,
            "num_blocks": self.num_blocks,
            "layers": [r.to_json() for r in self.layers],
            "outside_blocks": [r.to_json() for r in self.outside],
            "total": self.total_json(),
        }


def analyze_step(config: ModelConfig, hardware: Hardware, batch_size: int, new_tokens: int,
                 cached_tokens: int = 0, precision: Precision = Precision(), tp: int = 1,
                 flash_attention: bool = False, stage: str | None = None) -> StageReport:
    """One forward pass: ``batch_size`` sequences each adding ``new_tokens`` after ``cached_tokens``.

    Prefill is ``new_tokens=s, cached_tokens=0``; a decode step ``new_tokens=1,
    cached_tokens=L``; a chunk of a chunked prefill anything in between.
    """
    if batch_size < 1 or new_tokens < 1 or cached_tokens < 0:
        raise ValueError("batch size and new tokens must be >= 1, cached tokens >= 0")
    s = shard(config, tp)
    step = Step(batch_size, new_tokens, cached_tokens, config.sliding_window)
    rows = [evaluate(c, hardware, tp) for c in block_costs(config, precision, step, s, flash_attention)]
    outside = [evaluate(c, hardware, tp) for c in outside_block_costs(config, precision, step, s)]
    return StageReport(stage=stage or ("prefill" if cached_tokens == 0 and new_tokens > 1 else "decode"),
                       batch_size=batch_size, new_tokens=new_tokens, cached_tokens=cached_tokens,
                       num_blocks=config.num_hidden_layers, layers=rows, outside=outside)


@dataclass(frozen=True)
class EndToEnd:
    batch_size: int
    prompt_len: int
    gen_len: int
    ttft_s: float
    tpot_s: float                 # mean time per output token after the first
    decode_time_s: float          # all gen_len - 1 decode steps
    total_time_s: float
    tokens_per_s: float           # batch * gen_len / total time
    decode_tokens_per_s: float    # batch / tpot
    per_user_tokens_per_s: float  # 1 / tpot

    def to_json(self) -> dict:
        return asdict(self)


def _decode_time(config, hardware, batch_size, precision, tp, flash, cached: int) -> float:
    return analyze_step(config, hardware, batch_size, 1, cached, precision, tp, flash).time_s


def end_to_end(config: ModelConfig, hardware: Hardware, batch_size: int, prompt_len: int, gen_len: int,
               precision: Precision = Precision(), tp: int = 1, flash_attention: bool = False,
               prefill: StageReport | None = None) -> EndToEnd:
    if gen_len < 1:
        raise ValueError("generated length must be at least 1")
    prefill = prefill or analyze_step(config, hardware, batch_size, prompt_len, 0, precision, tp, flash_attention)
    steps = gen_len - 1
    step_time = lambda c: _decode_time(config, hardware, batch_size, precision, tp, flash_attention, c)  # noqa: E731
    if steps == 0:
        mean = step_time(prompt_len)
    elif steps <= EXACT_STEPS:
        mean = sum(step_time(prompt_len + j) for j in range(steps)) / steps
    else:
        first, last = prompt_len, prompt_len + steps - 1
        xs = [first + (last - first) * k / (SAMPLE_POINTS - 1) for k in range(SAMPLE_POINTS)]
        ys = [step_time(round(x)) for x in xs]
        mean = sum((ys[k] + ys[k + 1]) / 2 for k in range(SAMPLE_POINTS - 1)) / (SAMPLE_POINTS - 1)
    decode = mean * steps
    total = prefill.time_s + decode
    return EndToEnd(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, ttft_s=prefill.time_s,
                    tpot_s=mean, decode_time_s=decode, total_time_s=total,
                    tokens_per_s=batch_size * gen_len / total, decode_tokens_per_s=batch_size / mean,
                    per_user_tokens_per_s=1 / mean)


def model_summary(config: ModelConfig) -> dict:
    return {
        "name": config.name, "architecture": config.architecture, "num_parameters": config.num_parameters,
        "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
    }


@dataclass(frozen=True)
class RooflineReport:
    config: ModelConfig
    hardware: Hardware
    precision: Precision
    batch_size: int
    prompt_len: int
    gen_len: int
    tp: int
    flash_attention: bool
    prefill: StageReport
    decode: StageReport
    memory: MemoryBreakdown
    e2e: EndToEnd
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if not self.hardware.memory_bytes:
            return None
        return self.memory.total_bytes <= self.hardware.memory_bytes

    def to_json(self) -> dict:
        memory = self.memory.to_json()
        memory["fits_on_hardware"] = self.fits
        return {
            "model": model_summary(self.config),
            "hardware": self.hardware.to_json(),
            "settings": {
                "batch_size": self.batch_size, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                "tp": self.tp, "flash_attention": self.flash_attention, **asdict(self.precision),
            },
            "prefill": self.prefill.to_json(),
            "decode": self.decode.to_json(),
            "memory": memory,
            "e2e": self.e2e.to_json(),
            "notes": list(self.notes),
        }


def analyze(config: ModelConfig, hardware: Hardware, batch_size: int = 1, prompt_len: int = 1024,
            gen_len: int = 128, w_bits: int = 16, a_bits: int = 16, kv_bits: int = 16,
            group_size: int = 128, tp: int = 1, flash_attention: bool = False,
            base_bits: int = 16) -> RooflineReport:
    """Prefill of ``prompt_len`` tokens, one decode step after it, memory and end-to-end estimate."""
    if prompt_len < 1:
        raise ValueError("prompt length must be at least 1")
    precision = Precision(w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits, group_size=group_size,
                          base_bits=base_bits)
    prefill = analyze_step(config, hardware, batch_size, prompt_len, 0, precision, tp, flash_attention, "prefill")
    decode = analyze_step(config, hardware, batch_size, 1, prompt_len, precision, tp, flash_attention, "decode")
    e2e = end_to_end(config, hardware, batch_size, prompt_len, gen_len, precision, tp, flash_attention, prefill)
    memory = memory_breakdown(config, batch_size, prompt_len + gen_len, precision, tp,
                              flash_attention=flash_attention)
    notes = []
    if tp > 1 and not hardware.link_bandwidth:
        notes.append("no interconnect bandwidth given: all-reduce time is not counted")
    if prompt_len + gen_len > config.max_position_embeddings:
        notes.append(f"prompt + generated length exceeds the model's {config.max_position_embeddings} positions")
    return RooflineReport(config=config, hardware=hardware, precision=precision, batch_size=batch_size,
                          prompt_len=prompt_len, gen_len=gen_len, tp=tp, flash_attention=flash_attention,
                          prefill=prefill, decode=decode, memory=memory, e2e=e2e, notes=notes)


def prediction_vs_measurement(report: RooflineReport, ttft_s: float | None = None,
                              tpot_s: float | None = None) -> list[dict]:
    """Rows for ``pagellm bench``: predicted beside measured, and measured / predicted."""
    rows = []
    for metric, predicted, measured in (("ttft_s", report.e2e.ttft_s, ttft_s),
                                        ("tpot_s", report.e2e.tpot_s, tpot_s)):
        rows.append({"metric": metric, "predicted": predicted, "measured": measured,
                     "ratio": (measured / predicted) if measured is not None and predicted else None})
    return rows
