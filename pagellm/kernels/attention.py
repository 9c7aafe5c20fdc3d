"""One attention interface for the model; backends behind it.

A layer's share of the paged KV pool is a ``LayerKVCache``: ``k`` and ``v`` of
shape ``[num_blocks, block_size, num_kv_heads, head_dim]`` (the pool's owner,
``pagellm.engine.kv_cache``, decides where they live). A quantized cache
(``kernels.kv_quant``) holds int8 or fp8 codes there and, in ``k_scale`` and
``v_scale``, one fp16 scale per token per KV head laid out
``[num_blocks, num_kv_heads, block_size]`` (views of ``kv_quant.scale_pairs``:
a token's K and V scales are adjacent in memory); backends quantize in
``write_kv`` and dequantize inside ``attend``. A backend writes new K/V into it
and attends over it; the model never indexes the pool itself. A batch is a flat
run of tokens from several sequences, each sequence contributing a prefill
chunk or a single decode token:

* ``query_start_loc[b]:query_start_loc[b+1]`` are sequence b's new tokens,
* ``seq_lens[b]`` is its context length once they are written (cached + new),
* ``block_tables[b, i]`` is the pool block holding its positions
  ``i*block_size .. (i+1)*block_size-1``,
* ``slot_mapping[t]`` is where token t's K/V go (``block * block_size +
  offset``; -1 for padding tokens, which write nothing).

New token b,i sits at position ``seq_lens[b] - query_len[b] + i`` and sees keys
at positions ``p <= position`` (and ``p > position - sliding_window`` when a
window is set).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Protocol

import torch


@dataclass
class LayerKVCache:
    """One layer's K and V pages (and their scales when quantized)."""
    k: torch.Tensor                 # [num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor
    k_scale: torch.Tensor | None = None     # [num_blocks, num_kv_heads, block_size] fp16
    v_scale: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32
    slot_mapping: torch.Tensor      # [T] int64
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def to(self, device: torch.device) -> AttentionMetadata:
        """A copy on ``device`` (asynchronous from pinned host memory)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


class AttentionBackend(Protocol):
    """Paged attention, plus ``ops``: the module of elementwise ops (rms_norm,
    rotary, silu_and_mul) that runs best beside it."""
    name: str
    ops: ModuleType
    fused: bool     # attends without materialising the [queries, keys] score matrix

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        """Store token K/V ``[T, Hkv, D]`` at their slots (slot -1: padding, nothing written)."""

    def rotate_and_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        """``ops.rotary(q, k, positions, cos_sin_cache)`` (in place), then ``write_kv(k, v, ...)``;
        a backend may fuse the two (the Triton one does: one launch per layer fewer at decode)."""

    def attend(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        """Attention of ``q [T, H, D]`` over each sequence's cached context; returns ``[T, H, D]``."""


def get_attention_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """``auto`` picks the Triton kernels on a CUDA device when Triton is present,
    the torch reference otherwise; ``torch`` or ``triton`` force one."""
    device = torch.device(device)
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend must be auto, torch or triton, got {name!r}")
    if name == "triton" or (name == "auto" and device.type == "cuda" and _triton_available()):
        from pagellm.kernels.triton_attention import TritonAttention
        return TritonAttention()
    from pagellm.kernels.torch_attention import TorchAttention
    return TorchAttention()


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
