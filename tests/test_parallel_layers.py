"""Tensor-parallel layers in one process: each rank's slice, loaded from the
whole checkpoint tensor through the linear-method seam, computes its part of
the one-process layer exactly (column-parallel: its output columns;
row-parallel: partial sums that add up to the whole), for dense, int8 and
int4 weights; an int4 group that would straddle two ranks is a clear error."""
from __future__ import annotations

import pytest
import torch

from pagellm.distributed.groups import TensorGroup
from pagellm.model.layers import DENSE, LayerFactory
from pagellm.kernels import torch_quant
from pagellm.quant.methods import Int4LinearMethod, Int8LinearMethod, W8A8LinearMethod

METHODS = {"dense": lambda: DENSE, "int8": Int8LinearMethod, "int4": lambda: Int4LinearMethod(group_size=16)}
IN, OUT = 256, 128      # int4 codes come in runs of 128 input columns: each rank of the row layer holds one run


@pytest.mark.parametrize("method", list(METHODS))
def test_ranks_compute_the_one_process_layer(method):
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(OUT, IN, generator=g), torch.randn(OUT, IN, generator=g)
    down, bias = torch.randn(IN, 2 * OUT, generator=g), torch.randn(IN, generator=g)
    x = torch.randn(5, IN, generator=g)

    def make(tp):
        factory = LayerFactory(torch.float32, lambda prefix: METHODS[method](), tp)
        column = factory.column("layers.0.mlp.gate_up_proj", IN, [OUT, OUT])
        column.weight_loaders["weight"](gate, 0)
        column.weight_loaders["weight"](up, 1)
        row = factory.row("layers.0.mlp.down_proj", 2 * OUT, IN, bias=True)
        row.weight_loaders["weight"](down, None)
        row.weight_loaders["bias"](bias, None)
        return column, row

    whole_column, whole_row = make(TensorGroup())
    ranks = [make(TensorGroup(rank, 2)) for rank in range(2)]
    with torch.no_grad():
        # column: each rank's rows of each shard (gate | up) are the one-process output's columns
        whole = whole_column(x)
        for rank, (column, _) in enumerate(ranks):
            part = column(x)
            for shard, (lo, hi) in enumerate(((0, OUT), (OUT, 2 * OUT))):
                mine = slice(lo + rank * OUT // 2, lo + (rank + 1) * OUT // 2)
                torch.testing.assert_close(part[:, shard * OUT // 2:(shard + 1) * OUT // 2], whole[:, mine],
                                           rtol=0, atol=0)
        # row: partial products over each rank's input columns sum to the one-process output (bias once)
        h = torch.randn(5, 2 * OUT, generator=g)
        partial = sum(row.method.apply(row, h[:, rank * OUT:(rank + 1) * OUT]) for rank, (_, row) in enumerate(ranks))
        torch.testing.assert_close(partial, whole_row(h), rtol=1e-5, atol=1e-4)


def test_an_int4_group_straddling_two_ranks_is_refused():
    factory = LayerFactory(torch.float32, lambda prefix: Int4LinearMethod(group_size=64), TensorGroup(0, 2))
    with pytest.raises(ValueError, match="int4 groups of 64 do not divide the input size 32 .tensor parallelism: "
                                         "each of 2 ranks holds 32 of the 64 input columns"):
        factory.row("layers.0.self_attn.o_proj", 64, 64)


def test_a_rank_loads_the_same_slices_from_unread_safetensors(tmp_path):
    """``LazySlice``: narrowed to the rank's rows or columns before anything is read."""
    from safetensors.torch import save_file

    from pagellm.model.hf_loader import HFWeights
    g = torch.Generator().manual_seed(1)
    tensors = {"qkv": torch.randn(96, IN, generator=g), "o": torch.randn(IN, 64, generator=g)}
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, tmp_path / "model.safetensors")
    unread = dict(HFWeights.open(tmp_path).slices())
    factory = LayerFactory(torch.float32, lambda prefix: DENSE, TensorGroup(1, 2))
    for source in (tensors, unread):
        qkv = factory.qkv("layers.0.self_attn.qkv_proj", IN, 16, 4, 1, bias=False)   # 4 heads of 16, 1 KV head
        for shard, (lo, hi) in enumerate(((0, 64), (64, 80), (80, 96))):
            qkv.weight_loaders["weight"](source["qkv"].narrow(0, lo, hi - lo), shard)
        o = factory.row("layers.0.self_attn.o_proj", 64, IN)
        o.weight_loaders["weight"](source["o"], None)
        if source is tensors:
            expected = qkv.weight.clone(), o.weight.clone()
    torch.testing.assert_close(qkv.weight, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(o.weight, expected[1], rtol=0, atol=0)
    # rank 1 of 2: query heads 2..3, the one KV head replicated, input columns 32..63 of o
    torch.testing.assert_close(qkv.weight[:32], tensors["qkv"][32:64], rtol=0, atol=0)
    torch.testing.assert_close(qkv.weight[32:48], tensors["qkv"][64:80], rtol=0, atol=0)
    torch.testing.assert_close(o.weight, tensors["o"][:, 32:], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dense", "int8"])
def test_vocab_slices_padded_when_the_ranks_do_not_divide_the_vocabulary(method):
    """10 rows over 3 ranks: 4, 4 and 2 real rows + 2 zero rows; the ranks' logits,
    side by side and cut to 10, are the one-process LM head's; each rank embeds the
    ids it holds and gives zeros for the rest."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden = 10, IN
    weight, x, ids = torch.randn(vocab, hidden, generator=g), torch.randn(3, hidden, generator=g), torch.arange(vocab)

    def make(tp):
        head = LayerFactory(torch.float32, lambda prefix: METHODS[method](), tp).vocab("lm_head", hidden, vocab)
        head.weight_loaders["weight"](weight, None)
        return head

    whole = make(TensorGroup())
    ranks = [make(TensorGroup(rank, 3)) for rank in range(3)]
    with torch.no_grad():
        logits = torch.cat([head.method.apply(head, x) for head in ranks], dim=-1)
        assert logits.shape[-1] == 12
        torch.testing.assert_close(logits[:, :vocab], whole(x))
        assert torch.count_nonzero(logits[:, vocab:]) == 0
        rows = sum(head.method.embed(head, (ids - head.row_ranges[0][0]).clamp(0, 3)) *
                   ((ids >= head.row_ranges[0][0]) & (ids < head.row_ranges[0][0] + 4))[:, None] for head in ranks)
        torch.testing.assert_close(rows, whole.embed(ids), rtol=0, atol=0)


def test_w8a8_ranks_quantize_their_own_input_slices():
    """A calibrated (smoothed) w8a8 down projection over 2 ranks: each rank holds
    its columns of the input smoothing and of the whole-row int8 codes, and
    quantizes its slice of each token with its own scale (as vLLM does), so its
    partial product is the naive one below, and the partials sum to the
    one-process layer within int8 noise."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(IN, 2 * OUT, generator=g), torch.randn(5, 2 * OUT, generator=g)
    s = torch.rand(2 * OUT, generator=g) + 0.5

    def make(tp):
        row = LayerFactory(torch.float32, lambda prefix: W8A8LinearMethod(smoothing=s), tp).row(
            "layers.0.mlp.down_proj", 2 * OUT, IN)
        row.weight_loaders["weight"](weight, None)
        return row

    q, scale = torch_quant.quantize_int8(weight * s)
    partials = []
    with torch.no_grad():
        for rank in range(2):
            row, cols = make(TensorGroup(rank, 2)), slice(rank * OUT, (rank + 1) * OUT)
            partial = row.method.apply(row, x[:, cols])
            qx, xscale = torch_quant.quantize_int8(x[:, cols] / s[cols])
            naive = (qx.double() @ q[:, cols].double().t()) * xscale.double()[:, None] * scale.double()
            torch.testing.assert_close(partial, naive.float(), rtol=1e-5, atol=1e-4)
            partials.append(partial)
        whole = make(TensorGroup())(x)
        assert (sum(partials) - whole).abs().max() < 0.02 * whole.abs().max()
