"""One attention interface for the model; backends behind it.

The KV cache is one tensor for all layers, ``[2, num_layers, num_blocks,
block_size, num_kv_heads, head_dim]``; a layer sees ``k_cache``/``v_cache`` of
shape ``[num_blocks, block_size, num_kv_heads, head_dim]``. A batch is a flat
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
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch


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

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Paged attention, plus ``ops``: the module of elementwise ops (rms_norm,
    rotary, silu_and_mul) that runs best beside it."""
    name: str
    ops: ModuleType

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, sliding_window: int | None) -> torch.Tensor: ...


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
