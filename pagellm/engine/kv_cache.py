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

The host pool (``num_host_blocks`` > 0) is a second tensor ``[num_host_blocks, 2,
num_layers, block_size, num_kv_heads, head_dim]`` in host memory (pinned when
the pool is on CUDA), one contiguous run of bytes per block so each block moves
in one copy. ``swap(out, in_)`` runs every (device block, host block) pair of
``out`` device -> host, then every pair of ``in_`` host -> device (the engine
relies on that order: a device block spilled to the host and handed to
another block in the same step is read before it is written). On CUDA the
copies run on a side stream, and the compute stream waits on an event
recorded after them, so the step's forward (and its copy-on-write copies)
see the moved blocks; on the CPU they run in place. Blocks are gathered into
(or scattered from) a contiguous staging tensor at most ``STAGE_BYTES`` at a
time: the pool fills the device, and a transient of a long sequence's whole KV
would not fit beside it.

A quantized cache (``kv_cache_dtype`` int8 or fp8, ``kernels.kv_quant``) holds
codes in the pool and a second tensor of scales ``[2, num_layers,
num_physical_blocks, num_kv_heads, block_size]`` (fp16; a token's K and V
scales adjacent in memory, ``kv_quant.scale_pairs``), indexed by the same
block ids: a prefix-cache hit or a beam sharing a block shares its scales, and
every block copy (copy-on-write forks, swaps to and from the host pool, which
has a scales tensor of its own) moves both. ``bytes_per_token`` counts the
scales, and is ``pagellm.sizing``'s formula.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pagellm import sizing
from pagellm.kernels.attention import LayerKVCache
from pagellm.kernels.kv_quant import SCALE_DTYPE, format_of, kv_format, scale_pairs
from pagellm.model.config import ModelConfig
from pagellm.sizing import shard

STAGE_BYTES = 64 << 20


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
    def for_model(cls, config: ModelConfig, dtype: torch.dtype, block_size: int, tensor_parallel_size: int = 1,
                  num_layers: int | None = None, kv_cache_dtype: str = "auto") -> KVCacheSpec:
        """One rank's share: its KV heads (``sizing.shard``) of its ``num_layers`` (default: all).
        ``kv_cache_dtype``: ``auto`` stores ``dtype`` (the model's), else a ``kv_quant`` format."""
        fmt = kv_format(kv_cache_dtype)
        return cls(num_layers or config.num_hidden_layers, shard(config, tensor_parallel_size).kv_heads,
                   config.head_dim, dtype if fmt is None else fmt.storage, block_size,
                   has_null_block=config.sliding_window is not None)

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
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str,
                 num_host_blocks: int = 0) -> None:
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
            self.scales = scale_pairs(spec.num_layers, physical, spec.num_kv_heads, spec.block_size, device=device)
        self.layers = [LayerKVCache(self.pool[0, i], self.pool[1, i],
                                    *((self.scales[0, i], self.scales[1, i]) if spec.quantized else ()))
                       for i in range(spec.num_layers)]
        on_cuda = self.pool.device.type == "cuda"
        self.host_pool = torch.empty(num_host_blocks, *self.pool[:, :, 0].shape, dtype=spec.dtype,
                                     pin_memory=on_cuda)
        self.host_scales = (torch.empty(num_host_blocks, *self.scales[:, :, 0].shape, dtype=SCALE_DTYPE,
                                        pin_memory=on_cuda) if spec.quantized else None)
        self._copy_stream = torch.cuda.Stream(self.pool.device) if on_cuda and num_host_blocks else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pool, self.scales) if t is not None)

    @property
    def host_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.host_pool, self.host_scales) if t is not None)

    def swap(self, out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> None:
        """Copy (device, host) block pairs: ``out`` device -> host, then ``in_`` host -> device."""
        if not (out or in_):
            return
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:   # the blocks' last writes (an earlier step) come first
                stream.wait_stream(torch.cuda.current_stream(self.pool.device))
            step = max(1, STAGE_BYTES // self.spec.bytes_per_block)
            pairs = [(self.pool, self.host_pool)] + ([(self.scales, self.host_scales)] if self.spec.quantized else [])
            for device, host_tensor in pairs:    # block ids index dim 2 of the pool and of the scales
                for part in (out[i:i + step] for i in range(0, len(out), step)):
                    staged = device[:, :, self._ids([d for d, _ in part])].movedim(2, 0).contiguous()
                    for row, (_, host) in enumerate(part):
                        host_tensor[host].copy_(staged[row], non_blocking=True)
                for part in (in_[i:i + step] for i in range(0, len(in_), step)):
                    staged = torch.empty(len(part), *host_tensor.shape[1:], dtype=device.dtype, device=device.device)
                    for row, (_, host) in enumerate(part):
                        staged[row].copy_(host_tensor[host], non_blocking=True)
                    device[:, :, self._ids([d for d, _ in part])] = staged.movedim(0, 2)
        if stream is not None:
            torch.cuda.current_stream(self.pool.device).wait_stream(stream)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, device=self.pool.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate blocks ``src -> dst`` in every layer, K and V, with their scales."""
        if pairs:
            src, dst = (torch.tensor(ids, device=self.pool.device) for ids in zip(*pairs))
            self.pool[:, :, dst] = self.pool[:, :, src]
            if self.scales is not None:
                self.scales[:, :, dst] = self.scales[:, :, src]
