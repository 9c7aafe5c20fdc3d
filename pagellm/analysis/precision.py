"""Bit widths, quantized tensor sizes and tensor-parallel shards.

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
``kv < 8`` add one FP16 scale per vector (2 bytes: per-token, per-head
quantization). 8-bit KV (FP8 E4M3 or INT8) uses per-tensor scales, whose size
is negligible.

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

DTYPE_BITS = {"fp32": 32, "float32": 32, "fp16": 16, "float16": 16, "half": 16,
              "bf16": 16, "bfloat16": 16}
_W_BITS = (32, 16, 8, 4)
_A_BITS = (32, 16, 8)
_KV_BITS = (32, 16, 8, 4)


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
        scale = 2 if self.kv_bits < 8 else 0
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
