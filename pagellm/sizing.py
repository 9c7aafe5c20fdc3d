"""Closed-form sizes of a served model: bit widths, weights, KV cache,
activations, tensor-parallel shards.

The one neutral place for these formulas: the engine sizes its KV pool and
estimates what it cannot measure from them, the analyzer predicts from them,
and neither imports the other.

Notation: ``H`` hidden size, ``L`` layers, ``I`` intermediate size, ``V``
vocabulary, ``hd`` head dim, ``qh`` / ``kvh`` query / KV heads on this GPU,
``I_g`` / ``V_g`` the shares of ``I`` / ``V`` on this GPU, ``a`` activation
bytes, ``B`` batch, ``C`` context length. Every figure is per GPU.

Weights
    per block: q ``H x qh*hd``, k and v ``H x kvh*hd``, o ``qh*hd x H``,
    gate and up ``H x I_g``, down ``I_g x H`` at the weight width (with
    scales, see Weight bytes below); QKV biases (Qwen2) and the two RMSNorm
    vectors at the base width. Plus the embedding ``V_g x H``, the final norm
    ``H`` and, unless tied to the embedding, the LM head ``V_g x H``, all at
    the base width. With TP = 1 and 16 bits this is ``2 * num_parameters``:
    Llama-2-7B = 13.48 GB.

KV cache
    per token ``2 * L * kvh * kv_vector_bytes`` (K and V), i.e.
    ``2 * L * kvh * hd * kv_bits / 8`` for 16 bits, plus scales below 16 (see
    KV cache bytes); Llama-2-7B fp16:
    512 KiB, Llama-3-8B (8 KV heads): 128 KiB. A sequence of context ``C``
    stores ``min(C, sliding_window)`` tokens (older ones fall out of the
    window and their pages are freed), rounded up to whole pages of
    ``block_size`` tokens. Total ``B x`` that.

Activations (peak of one step of ``T = min(prefill_chunk, B*C)`` tokens that
samples ``B`` rows; inference keeps no activations across layers). Two phases
never overlap, so the peak is the larger:
    forward, inside a block: the residual stream ``4*T*H*a`` (the block's
    input and residual, which its caller still holds, and the normed input
    and new residual it makes), plus the larger of the attention phase
    ``T*(H + 2*qh*hd + 2*kvh*hd)*a`` (Q, K, V, attention output, O
    projection) and the MLP phase ``3*T*I_g*a`` (gate, up, their product).
    Without FlashAttention the score matrix ``qh*T*min(C, window)*a`` joins
    the attention phase.
    sampling: the final hidden states ``T*H*a``, the sampled rows' ``B*H*a``
    and their FP32 logits ``B*V*4``, plus the sampler's working set: it takes
    ``R = sampler_chunk_rows(V)`` rows at a time and the heaviest path
    (penalties, temperature, min-p/top-k/top-p, noise, log-probabilities)
    holds ``SAMPLER_COPIES + CUDA_SORT_COPIES`` fp32 tensors of
    ``min(B, R) x V`` at once.

Weight bytes
------------
A linear layer with ``in_f`` inputs and ``out_f`` outputs stored at ``w`` bits:

* ``w >= 16``:  ``in_f * out_f * w / 8``
* ``w < 16`` (symmetric group quantization along the input dimension, group
  size ``G``, one FP16 scale per group):
  ``in_f * out_f * w / 8 + out_f * ceil(in_f / G) * 2``.
  ``G = -1`` means one scale per output channel (``out_f * 2`` bytes).

  With ``G = 32`` this reproduces GGUF Q8_0 (8.5 bits/weight) and Q4_0
  (4.5 bits/weight) exactly. Asymmetric schemes (GPTQ/AWQ zero points) add
  another ``w`` bits per group, under 0.5 % of the weight at ``G = 128``; we
  leave them out.

Only the linear layers of the transformer blocks are quantized. Embeddings,
the LM head, norms and biases stay at the base width (``base_bits``, 16 for
fp16/bf16, 32 for fp32), as GPTQ/AWQ checkpoints ship them.

KV cache bytes
--------------
One head's K (or V) vector for one token is ``head_dim * kv / 8`` bytes; for
``kv <= 8`` add one FP16 scale per vector (``KV_SCALE_BYTES``: per-token,
per-head quantization, as the engine's ``kv_cache_dtype`` int8 and fp8 store
it). Llama-3-8B at 8 bits: 2 * 32 * 8 * 130 = 65 KiB a token, 1.97x fewer
than 16 bits; head_dim 64 (Qwen2.5-0.5B): 1.94x.

Tensor parallelism (Megatron layout)
------------------------------------
Q/K/V/gate/up are split by output columns, O/down by input rows, embedding
and LM head by vocabulary rows; norms are replicated. Each GPU holds
``heads / tp`` query heads and ``kv_heads / tp`` KV heads; when ``tp`` exceeds
the KV head count each KV head is replicated and a GPU holds one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pagellm.model.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16
LOGIT_BYTES = 4  # logits are upcast to fp32 for sampling
# The sampler works through its rows in chunks of about this many logits (``sampler_chunk_rows``), each
# holding at most SAMPLER_COPIES fp32 tensors of the chunk's size on its heaviest path (penalties,
# temperature, min-p/top-k/top-p, noise, log-probabilities; tests/test_sampler counts them) plus, on
# CUDA, CUDA_SORT_COPIES more for the sort's key/index buffers (measured on an H200).
SAMPLER_CHUNK_ELEMENTS = 1 << 23
SAMPLER_COPIES = 11.5
CUDA_SORT_COPIES = 5

DTYPE_BITS = {"fp32": 32, "float32": 32, "fp16": 16, "float16": 16, "half": 16,
              "bf16": 16, "bfloat16": 16}
_W_BITS = (32, 16, 8, 4)
# The engine's weight formats (EngineConfig.quantization) in the terms above: (w_bits, group_size, a_bits or
# None for the model's). The engine's int8 keeps one scale per output channel, its int4 one fp16 scale (and a
# uint8 zero point, left out as above) per 128 inputs.
WEIGHT_FORMATS = {"int8": (8, -1, None), "w8a8": (8, -1, 8), "int4": (4, 128, None), "int4-awq": (4, 128, None)}
_A_BITS = (32, 16, 8)
_KV_BITS = (32, 16, 8, 4)
KV_SCALE_BYTES = 2   # one fp16 scale per token per KV head, K and V each, for KV below 16 bits


def dtype_bits(name: str) -> int:
    try:
        return DTYPE_BITS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp16, bf16, fp32") from None


@dataclass(frozen=True)
class Precision:
    w_bits: int = 16        # block linear weights
    a_bits: int = 16        # activations (and matmul inputs)
    kv_bits: int = 16       # KV cache elements
    group_size: int = 128   # weight quantization group (input dim); -1 = per output channel
    base_bits: int = 16     # unquantized tensors: embeddings, LM head, norms, biases

    def __post_init__(self) -> None:
        if self.w_bits not in _W_BITS:
            raise ValueError(f"weight bits must be one of {_W_BITS}, got {self.w_bits}")
        if self.a_bits not in _A_BITS:
            raise ValueError(f"activation bits must be one of {_A_BITS}, got {self.a_bits}")
        if self.kv_bits not in _KV_BITS:
            raise ValueError(f"KV bits must be one of {_KV_BITS}, got {self.kv_bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group size must be positive or -1 (per channel), got {self.group_size}")
        if self.base_bits not in (16, 32):
            raise ValueError(f"base bits must be 16 or 32, got {self.base_bits}")

    @property
    def a_bytes(self) -> float:
        return self.a_bits / 8

    @property
    def base_bytes(self) -> float:
        return self.base_bits / 8

    def linear_weight_bytes(self, in_f: int, out_f: int) -> float:
        """Bytes of an ``in_f -> out_f`` weight matrix, scales included."""
        data = in_f * out_f * self.w_bits / 8
        if self.w_bits >= 16:
            return data
        groups = 1 if self.group_size == -1 else math.ceil(in_f / self.group_size)
        return data + out_f * groups * 2

    def kv_vector_bytes(self, head_dim: int) -> float:
        """Bytes of one head's K (or V) vector for one token."""
        scale = KV_SCALE_BYTES if self.kv_bits <= 8 else 0
        return head_dim * self.kv_bits / 8 + scale

    def label(self) -> str:
        g = "" if self.w_bits >= 16 else (" g-channel" if self.group_size == -1 else f" g{self.group_size}")
        return f"W{self.w_bits}A{self.a_bits} KV{self.kv_bits}{g}"


@dataclass(frozen=True)
class Shard:
    """What one GPU holds of a model under ``tp``-way tensor parallelism."""
    tp: int
    q_heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    kv_replicated: bool = False


def shard(config: ModelConfig, tp: int = 1) -> Shard:
    if tp < 1:
        raise ValueError(f"tensor-parallel degree must be >= 1, got {tp}")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tensor-parallel degree {tp} does not divide the {heads} attention heads")
    if kv % tp == 0:
        kv_per_gpu, replicated = kv // tp, False
    elif tp % kv == 0:
        kv_per_gpu, replicated = 1, True
    else:
        raise ValueError(f"tensor-parallel degree {tp} neither divides nor is a multiple of the {kv} KV heads")
    return Shard(tp=tp, q_heads=heads // tp, kv_heads=kv_per_gpu,
                 intermediate=math.ceil(config.intermediate_size / tp),
                 vocab=math.ceil(config.vocab_size / tp), kv_replicated=replicated)


# ---------------------------------------------------------------- sizes

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


HEAD_PRECISION = Precision(w_bits=8, group_size=-1)    # an untied LM head under weight-only formats (``quant``)


def _outside_block_weight_bytes(config: ModelConfig, precision: Precision, s: Shard) -> float:
    """The embedding and final norm at base precision; an untied LM head too, except under a weight-only
    format (weights below 16 bits, activations not), which holds it as int8 per output channel."""
    h = config.hidden_size
    table = s.vocab * h
    if config.tie_word_embeddings:
        lm_head = 0.0
    elif precision.w_bits < 16 <= precision.a_bits:
        lm_head = HEAD_PRECISION.linear_weight_bytes(h, s.vocab)
    else:
        lm_head = table * precision.base_bytes
    return (table + h) * precision.base_bytes + lm_head


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
    """Peak activation bytes on one GPU of a step of ``tokens`` tokens that samples ``batch_size`` rows."""
    s = shard(config, tp)
    h, hd, a = config.hidden_size, config.head_dim, precision.a_bytes
    stream = 4 * tokens * h * a
    attn = tokens * (h + 2 * s.q_heads * hd + 2 * s.kv_heads * hd) * a
    if not flash_attention:
        keys = min(context_len, config.sliding_window or context_len)
        attn += s.q_heads * tokens * keys * a
    mlp = 3 * tokens * s.intermediate * a
    v = config.vocab_size
    chunk = min(batch_size, sampler_chunk_rows(v))
    sampling = (tokens * h * a + batch_size * (h * a + v * LOGIT_BYTES)
                + (SAMPLER_COPIES + CUDA_SORT_COPIES) * chunk * v * LOGIT_BYTES)
    return max(stream + max(attn, mlp), sampling)


def sampler_chunk_rows(vocab_size: int) -> int:
    """Rows the sampler takes at once: about SAMPLER_CHUNK_ELEMENTS logits."""
    return max(1, SAMPLER_CHUNK_ELEMENTS // vocab_size)


# ---------------------------------------------------------------- weight offload

def offload_split(weights: float, layer: float, num_offloaded: int) -> tuple[float, float]:
    """(device, host) weight bytes with ``num_offloaded`` decoder layers of ``layer``
    bytes off the device: it keeps the others and two layer buffers."""
    if not num_offloaded:
        return weights, 0.0
    return weights - (num_offloaded - 2) * layer, num_offloaded * layer


def offloaded_layers(weights: float, layer: float, num_layers: int, device_budget: float) -> int | None:
    """Fewest decoder layers of ``layer`` bytes to keep off the device
    (``pagellm.model.offload``) so the weights left there fit ``device_budget``:
    offloading ``k`` layers leaves ``weights - (k - 2) * layer`` on the device
    (two layer buffers stream the others), so 0 when everything fits, else
    ``2 + ceil((weights - device_budget) / layer)``; None when even all
    ``num_layers`` are not enough."""
    if weights <= device_budget:
        return 0
    k = 2 + math.ceil((weights - device_budget) / layer)
    return k if k <= num_layers else None
