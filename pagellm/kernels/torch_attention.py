"""Reference paged attention in plain torch: correct on any device, and the
yardstick every fused kernel is checked against.

It gathers each sequence's K/V through its block table into a padded
``[B, max_seq_len]`` view, pads the queries to ``[B, max_query_len]``, and runs
one masked ``scaled_dot_product_attention`` for the whole mixed batch; no
Python loop over sequences, tokens or heads. A quantized cache
(``kernels.kv_quant``) is quantized as it is written and dequantized after the
gather, so only the sequences' own context is ever in float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagellm.kernels import torch_ops
from pagellm.kernels.attention import AttentionMetadata, LayerKVCache
from pagellm.kernels.kv_quant import dequantize, format_of, quantize


class TorchAttention:
    name = "torch"
    ops = torch_ops
    fused = False

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        write_kv_cache(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale)

    def rotate_and_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
        self.ops.rotary(q, k, positions, cos_sin_cache)
        self.write_kv(k, v, cache, slot_mapping)

    def attend(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        return paged_attention(q, cache.k, cache.v, meta, scale, sliding_window, cache.k_scale, cache.v_scale)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Scatter token K/V ``[T, Hkv, D]`` into their slots, quantized when the
    caches hold a ``kv_quant`` format (their scales in ``k_scale``, ``v_scale``);
    slot -1 is skipped."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    for x, pages, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        fmt = format_of(pages.dtype)
        if fmt is not None:
            x, scale = quantize(x, fmt)
            block_size = pages.shape[1]
            scales[slot_mapping // block_size, :, slot_mapping % block_size] = scale
            x = x.view(torch.int8)      # as raw bytes: CUDA has no index_copy_ for float8
            pages = pages.view(torch.int8)
        pages.view(-1, *pages.shape[-2:]).index_copy_(0, slot_mapping, x.to(pages.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
              first_key: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, max_seq_len, ...]`` copy of each sequence's cached K or V
    (``cache [num_blocks, block_size, ...]``); slots outside ``[first_key,
    seq_len)`` are zeroed: they may hold anything (the pool is uninitialised,
    and blocks behind a sliding window are given back), and a NaN there would
    leak through a zero attention weight."""
    blocks = cache[block_tables.long()]                  # [B, nb, bs, ...]
    batch, num_blocks, block_size = blocks.shape[:3]
    kv = blocks.reshape(batch, num_blocks * block_size, *cache.shape[2:])[:, :max_seq_len]
    positions = torch.arange(kv.shape[1], device=kv.device)[None, :]
    valid = positions < seq_lens.long()[:, None]
    if first_key is not None:
        valid &= positions >= first_key[:, None]
    return kv.masked_fill(~valid.view(*valid.shape, *(1,) * (kv.dim() - 2)), 0)


def gather_context(pages: torch.Tensor, scales: torch.Tensor | None, meta: AttentionMetadata,
                   first_key: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[B, max_seq_len, Hkv, D]`` of each sequence's cached K or V in ``dtype``,
    dequantized with its scales (``[num_blocks, Hkv, block_size]``) when given."""
    if scales is None:
        return gather_kv(pages, meta.block_tables, meta.seq_lens, meta.max_seq_len, first_key).to(dtype)
    # Codes are gathered as raw bytes (an fp8 NaN pattern becomes 0 like any other masked slot).
    codes = gather_kv(pages.view(torch.int8), meta.block_tables, meta.seq_lens, meta.max_seq_len, first_key)
    per_token = gather_kv(scales.transpose(1, 2), meta.block_tables, meta.seq_lens, meta.max_seq_len, first_key)
    return dequantize(codes.view(pages.dtype), per_token, dtype)


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
                    scale: float, sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new tokens ``q [T, H, D]`` over their cached context (codes
    and scales when quantized); returns ``[T, H, D]``. Tokens past
    ``query_start_loc[-1]`` (a CUDA graph's padding) belong to no sequence:
    their rows are zeros."""
    num_tokens, num_heads, head_dim = q.shape
    batch = meta.num_seqs
    query_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=q.device), query_lens)
    covered = seq_of_token.shape[0]
    row_of_token = torch.arange(covered, device=q.device) - meta.query_start_loc[:-1].long()[seq_of_token]

    padded_q = q.new_zeros(batch, meta.max_query_len, num_heads, head_dim)
    padded_q[seq_of_token, row_of_token] = q[:covered]
    first_key = None
    if sliding_window is not None:    # the first key the sequence's first new token sees
        first_key = (meta.seq_lens.long() - query_lens - sliding_window + 1).clamp_min(0)
    keys = gather_context(k_cache, k_scale, meta, first_key, q.dtype)
    values = gather_context(v_cache, v_scale, meta, first_key, q.dtype)
    mask = attention_mask(meta, sliding_window)

    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != keys.shape[2])
    out = out.transpose(1, 2)[seq_of_token, row_of_token]
    return out if covered == num_tokens else torch.cat([out, out.new_zeros(num_tokens - covered, *out.shape[1:])])
