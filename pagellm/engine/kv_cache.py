"""The KV cache's owner: layout, dtype, per-layer views, the null block and
block copies, in one object.

The pool is one tensor ``[2 (K, V), num_layers, num_physical_blocks,
block_size, num_kv_heads, head_dim]``; layer ``i`` sees it as a
``LayerKVCache`` (``kernels.attention``) and nothing else, so the model and the
attention backends never index the pool. Blocks ``0 .. num_blocks-1`` are the
ones the block manager hands out. With a sliding window one more block, the
*null block* (id ``num_blocks``), stands in the block tables for pages a
sequence has given back behind its window: never allocated, never written,
never read (attention masks those positions), but a valid index. This is the
only place that rule is made; the block manager is told the id.

Everything that depends on how KV is stored (a quantized dtype and its scales,
a host-side swap pool) belongs here; the block manager deals in block ids only.

A quantized cache (``kv_cache_dtype`` int8 or fp8, ``kernels.kv_quant``) holds
codes in the pool and a second tensor of scales ``[2, num_layers,
num_physical_blocks, num_kv_heads, block_size]`` (fp16), indexed by the same
block ids: a prefix-cache hit or a beam sharing a block shares its scales, and
every block copy (copy-on-write forks; later swap and offload) moves both.
``bytes_per_token`` counts the scales, and is ``pagellm.sizing``'s formula.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm import sizing
from pagellm.kernels.attention import LayerKVCache
from pagellm.kernels.kv_quant import SCALE_DTYPE, format_of, kv_format
from pagellm.model.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one token's K/V across all layers, and the paging. ``dtype``
    is what the pool stores: the model dtype, or a quantized format's codes."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    has_null_block: bool

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: torch.dtype, block_size: int,
                  kv_cache_dtype: str = "auto") -> KVCacheSpec:
        """``kv_cache_dtype``: ``auto`` stores ``dtype`` (the model's), else a ``kv_quant`` format."""
        fmt = kv_format(kv_cache_dtype)
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                   dtype if fmt is None else fmt.storage, block_size, has_null_block=config.sliding_window is not None)

    @property
    def quantized(self) -> bool:
        return format_of(self.dtype) is not None

    @property
    def bytes_per_token(self) -> int:
        vector = self.head_dim * self.dtype.itemsize + (sizing.KV_SCALE_BYTES if self.quantized else 0)
        return 2 * self.num_layers * self.num_kv_heads * vector

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.null_block: int | None = num_blocks if spec.has_null_block else None
        physical = num_blocks + spec.has_null_block
        self.pool = torch.empty(2, spec.num_layers, physical, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                dtype=spec.dtype, device=device)
        self.scales: torch.Tensor | None = None
        if spec.quantized:
            self.scales = torch.empty(2, spec.num_layers, physical, spec.num_kv_heads, spec.block_size,
                                      dtype=SCALE_DTYPE, device=device)
        self.layers = [LayerKVCache(self.pool[0, i], self.pool[1, i],
                                    *((self.scales[0, i], self.scales[1, i]) if spec.quantized else ()))
                       for i in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pool, self.scales) if t is not None)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate blocks ``src -> dst`` in every layer, K and V, with their scales."""
        if pairs:
            src, dst = (torch.tensor(ids, device=self.pool.device) for ids in zip(*pairs))
            self.pool[:, :, dst] = self.pool[:, :, src]
            if self.scales is not None:
                self.scales[:, :, dst] = self.scales[:, :, src]
