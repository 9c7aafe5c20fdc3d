"""Engine settings, as one dataclass the CLI, the offline API and the server share."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class EngineConfig:
    """``kv_cache_memory`` sizes the KV pool directly; ``gpu_memory`` is a total
    budget for weights + activations + KV (both absolute, e.g. "20GiB", so two
    engines can share a device); ``num_kv_blocks`` overrides both."""

    model: str
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"                # auto: cuda when available
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: str | int | None = None
    gpu_memory: str | int | None = None
    max_model_len: int | None = None    # default: the model's context length
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: 8192 on CUDA, 2048 on CPU
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"     # auto | torch | triton
    enforce_eager: bool = False         # no CUDA graphs
    random_weights: bool = False        # real shapes, random weights (benchmarks)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        return _DTYPES[self.dtype]

    @property
    def batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.torch_device.type == "cuda" else 2048
