"""Sizing the KV pool from a budget, and the engine's measured memory breakdown."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pagellm import sizing
from pagellm.config import EngineConfig
from pagellm.model.config import ModelConfig
from pagellm.sizing import Precision
from pagellm.utils.units import format_bytes, parse_bytes

_CPU_DEFAULT_KV = 2**30        # 1 GiB when no budget is given on the CPU
_CUDA_RESERVE = 2**30          # left free on the card when no budget is given, per model (its CUDA graphs' buffers)


def precision_of(dtype: torch.dtype) -> Precision:
    """The analyzer's description of an unquantized engine in ``dtype``."""
    bits = torch.finfo(dtype).bits
    return Precision(w_bits=bits, a_bits=bits, kv_bits=bits, base_bits=32 if bits == 32 else 16)


def estimated_activation_bytes(config: ModelConfig, num_tokens: int, num_sampled: int, max_model_len: int,
                               dtype: torch.dtype, fused_attention: bool, tensor_parallel_size: int = 1) -> int:
    """The closed-form activation peak (``pagellm.sizing``) of a step of
    ``num_tokens`` tokens sampling ``num_sampled`` rows on one tensor-parallel
    rank, used where it can't be measured (CPU)."""
    return int(sizing.activation_bytes(config, precision_of(dtype), num_tokens, num_sampled, max_model_len,
                                       tp=tensor_parallel_size, flash_attention=fused_attention))


@dataclass
class MemoryReport:
    weights_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    num_blocks: int
    block_size: int
    max_model_len: int
    activation_measured: bool
    fused_attention: bool       # the attention backend never materialises the score matrix
    host_kv_cache_bytes: int = 0
    num_host_blocks: int = 0
    host_weights_bytes: int = 0     # offloaded decoder layers, in host memory (or on disk)
    offloaded_layers: int = 0
    offload_tier: str = "host"
    kv_cache_dtype: str = "auto"
    draft_bytes: int = 0            # a speculative draft model: its weights and its KV pool

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        return self.kv_tokens / self.max_model_len

    def summary(self) -> str:
        how = "measured" if self.activation_measured else "estimated"
        offload = (f" + {format_bytes(self.host_weights_bytes)} on the {self.offload_tier} ({self.offloaded_layers} "
                   f"layers streamed)" if self.offloaded_layers else "")
        kv = "" if self.kv_cache_dtype == "auto" else f" {self.kv_cache_dtype}"
        return (f"memory: weights {format_bytes(self.weights_bytes)}{offload}, activations "
                f"{format_bytes(self.activation_bytes)}"
                f" ({how}), KV pool{kv} {format_bytes(self.kv_cache_bytes)} ({self.num_blocks} blocks x {self.block_size}"
                f" = {self.kv_tokens} tokens), max concurrency at {self.max_model_len} tokens: "
                f"{self.max_concurrency:.2f}"
                + (f"; host KV pool {format_bytes(self.host_kv_cache_bytes)} ({self.num_host_blocks} blocks)"
                   if self.num_host_blocks else "")
                + (f"; draft model {format_bytes(self.draft_bytes)} (weights and its KV pool)" if self.draft_bytes
                   else ""))

    def to_dict(self) -> dict:
        return asdict(self) | {"kv_tokens": self.kv_tokens, "max_concurrency": self.max_concurrency}


def plan_num_blocks(engine: EngineConfig, bytes_per_block: int, weights_bytes: int, activation_bytes: int,
                    num_models: int = 1) -> int:
    """Blocks in the pool: given outright, from a KV budget, or what a total budget leaves (on a card
    without a budget, a reserve is left for each of ``num_models`` models' CUDA graphs: a speculative
    draft captures its own)."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    if engine.kv_cache_memory is not None:
        budget = parse_bytes(engine.kv_cache_memory)
    elif engine.gpu_memory is not None:
        total = parse_bytes(engine.gpu_memory)
        budget = total - weights_bytes - activation_bytes
        if budget < bytes_per_block:
            raise ValueError(
                f"gpu_memory {format_bytes(total)} leaves no room for the KV cache after weights "
                f"{format_bytes(weights_bytes)} and activations {format_bytes(activation_bytes)}")
    elif engine.torch_device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.torch_device)
        budget = free - activation_bytes - _CUDA_RESERVE * num_models
    else:
        budget = _CPU_DEFAULT_KV
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(f"KV cache budget {format_bytes(budget)} is smaller than one block "
                         f"({format_bytes(bytes_per_block)})")
    return int(blocks)
