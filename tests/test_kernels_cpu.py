"""Kernel-side tests that need no GPU: backend selection, the Triton modules'
import guard, and the torch paged-attention reference against a naive loop.

The Triton kernels themselves are checked on a GPU by ``benchmarks/kernels.py``
(or, slowly and in fp16 only, under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import pathlib
import sys

import pytest
import torch

from pagellm.kernels.attention import AttentionMetadata, LayerKVCache, get_attention_backend
from pagellm.kernels.torch_attention import TorchAttention, paged_attention, write_kv_cache

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pagellm"
TRITON_MODULES = ("pagellm.kernels.triton_attention", "pagellm.kernels.triton_ops", "pagellm.kernels.triton_quant")
HAS_TRITON = importlib.util.find_spec("triton") is not None


# --------------------------------------------------------------------------- backend selection

def test_auto_on_cpu_is_torch():
    backend = get_attention_backend("auto", "cpu")
    assert isinstance(backend, TorchAttention) and backend.name == "torch"


def test_torch_forced_and_bad_name():
    assert get_attention_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError):
        get_attention_backend("flash", "cpu")


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed")
@pytest.mark.parametrize("module", TRITON_MODULES)
def test_triton_modules_raise_import_error_without_triton(module):
    sys.modules.pop(module, None)
    with pytest.raises(ImportError):
        importlib.import_module(module)


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed")
def test_forcing_triton_without_triton_raises_import_error():
    with pytest.raises(ImportError):
        get_attention_backend("triton", "cpu")


def test_only_triton_modules_import_triton_at_top_level():
    """Importing the package must not need triton: only the two Triton modules
    may import it at module level (lazy imports inside functions are fine)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module in TRITON_MODULES:
            continue
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "triton" or n.startswith("triton.") or n in TRITON_MODULES for n in names):
                offenders.append(module)
    assert offenders == []


# --------------------------------------------------------------------------- reference vs naive

def build_batch(gen, query_lens, seq_lens, block_size, num_kv_heads, head_dim, num_heads, dtype=torch.float64):
    """Random caches holding every sequence's K/V at shuffled blocks, plus metadata."""
    blocks_per_seq = [max(math.ceil(s / block_size), 1) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3                       # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = perm[at:at + n]
        at += n
    slots = [int(table[b, pos // block_size]) * block_size + pos % block_size
             for b, (ql, sl) in enumerate(zip(query_lens, seq_lens)) for pos in range(sl - ql, sl)]
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    meta = AttentionMetadata(query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             block_tables=table, slot_mapping=torch.tensor(slots, dtype=torch.int64),
                             max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, dtype=dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen, dtype=dtype)
    return q, k_cache, v_cache, meta


def naive_attention(q, k_cache, v_cache, meta, scale, sliding_window):
    """Per sequence: gather its K/V into contiguous tensors, then for every new
    token an explicit masked softmax (all heads at once) over the keys it may see."""
    block_size = k_cache.shape[1]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        seq_len = int(meta.seq_lens[b])
        start, end = int(meta.query_start_loc[b]), int(meta.query_start_loc[b + 1])
        positions = torch.arange(seq_len)
        blocks = meta.block_tables[b, positions // block_size].long()
        keys = k_cache[blocks, positions % block_size]            # [seq_len, Hkv, D]
        values = v_cache[blocks, positions % block_size]
        for i, token in enumerate(range(start, end)):
            pos = seq_len - (end - start) + i
            visible = positions <= pos
            if sliding_window is not None:
                visible &= positions > pos - sliding_window
            kv_head = torch.arange(num_heads) // group
            scores = torch.einsum("shd,hd->hs", keys[:, kv_head], q[token]) * scale      # [H, seq_len]
            scores = scores.masked_fill(~visible, -math.inf)
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            out[token] = torch.einsum("hs,shd->hd", weights, values[:, kv_head])
    return out


HEADS = [(4, 4), (8, 2), (8, 1), (6, 3)]          # MHA, GQA 4, MQA, GQA with 3 kv heads


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_paged_attention_matches_naive(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(1000 * block_size + 10 * num_heads + num_kv_heads)
    head_dim = 8
    for trial in range(6):
        batch = int(torch.randint(1, 6, (1,), generator=gen))
        query_lens, seq_lens = [], []
        for _ in range(batch):
            kind = int(torch.randint(0, 3, (1,), generator=gen))      # 0 decode, 1 fresh prefill, 2 chunk
            prefix = 0 if kind == 1 else int(torch.randint(0, 40, (1,), generator=gen))
            q_len = 1 if kind == 0 else int(torch.randint(1, 20, (1,), generator=gen))
            query_lens.append(q_len)
            seq_lens.append(prefix + q_len)
        window = [None, 1, 5, 13][trial % 4]
        q, k_cache, v_cache, meta = build_batch(gen, query_lens, seq_lens, block_size, num_kv_heads,
                                                head_dim, num_heads)
        scale = head_dim ** -0.5
        got = paged_attention(q, k_cache, v_cache, meta, scale, window)
        want = naive_attention(q, k_cache, v_cache, meta, scale, window)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"q={query_lens} s={seq_lens} window={window}: {m}")


def test_write_then_attend_round_trip():
    """Writing a chunk's K/V through write_kv_cache (padding slots -1 skipped)
    and attending equals attention over caches that already held them."""
    gen = torch.Generator().manual_seed(7)
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 8, 4
    query_lens, seq_lens = [3, 1, 6], [10, 7, 6]
    q, k_full, v_full, meta = build_batch(gen, query_lens, seq_lens, block_size, num_kv_heads, head_dim, num_heads)
    k_new = k_full.view(-1, num_kv_heads, head_dim)[meta.slot_mapping]
    v_new = v_full.view(-1, num_kv_heads, head_dim)[meta.slot_mapping]
    k_cache, v_cache = k_full.clone(), v_full.clone()
    k_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = 0
    v_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = 0
    padding = torch.randn(2, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
    slots = torch.cat([meta.slot_mapping, torch.tensor([-1, -1])])
    backend = TorchAttention()
    cache = LayerKVCache(k_cache, v_cache)
    backend.write_kv(torch.cat([k_new, padding]), torch.cat([v_new, padding]), cache, slots)
    assert torch.equal(k_cache, k_full) and torch.equal(v_cache, v_full)
    out = backend.attend(q, cache, meta, head_dim ** -0.5, None)
    torch.testing.assert_close(out, naive_attention(q, k_full, v_full, meta, head_dim ** -0.5, None))


def test_write_kv_cache_casts_to_cache_dtype():
    k = torch.randn(3, 2, 4)
    cache_k, cache_v = torch.zeros(2, 4, 2, 4, dtype=torch.bfloat16), torch.zeros(2, 4, 2, 4, dtype=torch.bfloat16)
    write_kv_cache(k, k, cache_k, cache_v, torch.tensor([5, 0, 7]))
    assert torch.equal(cache_k.view(-1, 2, 4)[torch.tensor([5, 0, 7])], k.to(torch.bfloat16))


def test_graph_padding_rows_and_empty_sequences():
    """A CUDA graph's padded batch: tokens past query_start_loc[-1] belong to no
    sequence (zero rows), padding sequences have no queries; the real rows are unchanged."""
    gen = torch.Generator().manual_seed(11)
    q, k_cache, v_cache, meta = build_batch(gen, [3, 1], [9, 5], 4, 2, 8, 4)
    want = naive_attention(q, k_cache, v_cache, meta, 8 ** -0.5, None)
    padded = AttentionMetadata(torch.tensor([0, 3, 4, 4, 4], dtype=torch.int32),
                               torch.tensor([9, 5, 0, 0], dtype=torch.int32),
                               torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)]),
                               torch.cat([meta.slot_mapping, torch.tensor([-1, -1, -1])]), max_query_len=7,
                               max_seq_len=12)
    got = paged_attention(torch.cat([q, torch.randn(3, 4, 8, generator=gen, dtype=q.dtype)]), k_cache, v_cache,
                          padded, 8 ** -0.5, None)
    torch.testing.assert_close(got[:4], want)
    assert torch.equal(got[4:], torch.zeros(3, 4, 8, dtype=q.dtype))


def naive_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of every head of ``x [T, H, D]``, element by element, in float64."""
    out = x.clone().double()
    half = inv_freq.shape[0]
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            c, s = math.cos(pos * float(inv_freq[i])), math.sin(pos * float(inv_freq[i]))
            a, b = x[t, :, i].double(), x[t, :, i + half].double()
            out[t, :, i], out[t, :, i + half] = a * c - b * s, b * c + a * s
    return out


def test_rotate_and_write_kv_matches_naive():
    """The torch twin of the Triton fused rotary + KV write (the GPU check compares
    the two): q and k rotated in place, k and v at their slots, slot -1 skipped
    (its q still rotated)."""
    from pagellm.model.layers import RotaryEmbedding
    gen = torch.Generator().manual_seed(5)
    rotary = RotaryEmbedding(8, 64, 10000.0, None)
    q, k, v = (torch.randn(4, h, 8, generator=gen) for h in (4, 2, 2))
    positions, slots = torch.tensor([0, 7, 33, 63]), torch.tensor([5, -1, 0, 9])
    cache = LayerKVCache(torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8))
    want_q, want_k = (naive_rotary(x, positions, 1.0 / 10000.0 ** (torch.arange(0, 8, 2).double() / 8))
                      for x in (q, k))
    TorchAttention().rotate_and_write_kv(q, k, v, positions, rotary.cos_sin_cache, cache, slots)
    torch.testing.assert_close(q.double(), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.double(), want_k, rtol=1e-5, atol=1e-5)
    flat_k, flat_v = cache.k.view(-1, 2, 8), cache.v.view(-1, 2, 8)
    assert torch.equal(flat_k[[5, 0, 9]], k[[0, 2, 3]]) and torch.equal(flat_v[[5, 0, 9]], v[[0, 2, 3]])
    assert int((flat_k != 0).any(-1).any(-1).sum()) == 3           # nothing else written


# --------------------------------------------------------------------------- the fp32 CPU linear (oneDNN)

@pytest.mark.parametrize("rows", [1, 2, 5, 9, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_matches_float64(rows, bias):
    """``cpu_linear.linear`` (oneDNN on the CPU) against ``x.double() @ w.double().T``: fp32 accuracy for
    the decode, verification and prefill row counts, 2-D and 3-D inputs, a non-contiguous input."""
    from pagellm.kernels.cpu_linear import linear
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(300, 200, generator=gen), torch.randn(300, generator=gen)
    x = torch.randn(rows, 260, generator=gen)[:, 30:230]       # rows 1040 bytes apart: not contiguous
    reference = x.double() @ w.double().T + (b.double() if bias else 0)
    out = linear(x, w, b if bias else None)
    assert out.dtype == torch.float32 and out.shape == (rows, 300)
    # fp32 rounding of a 200-term dot product of unit normals: well under 1e-4 absolute
    assert (out.double() - reference).abs().max() < 1e-4
    stacked = linear(x.reshape(1, rows, 200), w, b if bias else None)
    assert stacked.shape == (1, rows, 300) and torch.equal(stacked[0], out)
