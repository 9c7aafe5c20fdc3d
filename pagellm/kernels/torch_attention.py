"""Reference paged attention in plain torch: correct on any device, and the
yardstick every fused kernel is checked against.

It gathers each sequence's K/V through its block table into a padded
``[B, max_seq_len]`` view, pads the queries to ``[B, max_query_len]``, and runs
one masked ``scaled_dot_product_attention`` for the whole mixed batch; no
Python loop over sequences, tokens or heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagellm.kernels import torch_ops
from pagellm.kernels.attention import AttentionMetadata, LayerKVCache


class TorchAttention:
    name = "torch"
    ops = torch_ops
    fused = False

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        write_kv_cache(k, v, cache.k, cache.v, slot_mapping)

    def attend(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        return paged_attention(q, cache.k, cache.v, meta, scale, sliding_window)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter token K/V ``[T, Hkv, D]`` into their slots; slot -1 is skipped."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
              first_key: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, max_seq_len, Hkv, D]`` copy of each sequence's cached K or V; slots
    outside ``[first_key, seq_len)`` are zeroed: they may hold anything (the
    pool is uninitialised, and blocks behind a sliding window are given back),
    and a NaN there would leak through a zero attention weight."""
    blocks = cache[block_tables.long()]                  # [B, nb, bs, Hkv, D]
    batch, num_blocks, block_size = blocks.shape[:3]
    kv = blocks.reshape(batch, num_blocks * block_size, *cache.shape[-2:])[:, :max_seq_len]
    positions = torch.arange(kv.shape[1], device=kv.device)[None, :]
    valid = positions < seq_lens.long()[:, None]
    if first_key is not None:
        valid &= positions >= first_key[:, None]
    return kv.masked_fill(~valid[:, :, None, None], 0)


def attention_mask(meta: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """``[B, max_query_len, max_seq_len]`` bool: which keys each padded query sees."""
    device = meta.seq_lens.device
    query_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    seq_lens = meta.seq_lens.long()
    rows = torch.arange(meta.max_query_len, device=device)
    cols = torch.arange(meta.max_seq_len, device=device)
    query_pos = (seq_lens - query_lens)[:, None] + rows[None, :]          # [B, Q]
    mask = cols[None, None, :] <= query_pos[:, :, None]
    if sliding_window is not None:
        mask &= cols[None, None, :] > query_pos[:, :, None] - sliding_window
    # Padding rows (beyond a sequence's query length) see key 0 so softmax stays finite.
    padding = rows[None, :] >= query_lens[:, None]
    mask[padding] = False
    mask[..., 0] |= padding
    return mask


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Attention of new tokens ``q [T, H, D]`` over their cached context; returns ``[T, H, D]``."""
    num_tokens, num_heads, head_dim = q.shape
    batch = meta.num_seqs
    query_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=q.device), query_lens)
    row_of_token = torch.arange(num_tokens, device=q.device) - meta.query_start_loc[:-1].long()[seq_of_token]

    padded_q = q.new_zeros(batch, meta.max_query_len, num_heads, head_dim)
    padded_q[seq_of_token, row_of_token] = q
    first_key = None
    if sliding_window is not None:    # the first key the sequence's first new token sees
        first_key = (meta.seq_lens.long() - query_lens - sliding_window + 1).clamp_min(0)
    keys = gather_kv(k_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, first_key).to(q.dtype)
    values = gather_kv(v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, first_key).to(q.dtype)
    mask = attention_mask(meta, sliding_window)

    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != keys.shape[2])
    return out.transpose(1, 2)[seq_of_token, row_of_token]
