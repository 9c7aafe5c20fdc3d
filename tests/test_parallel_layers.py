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
from pagellm.quant.methods import Int4LinearMethod, Int8LinearMethod

METHODS = {"dense": lambda: DENSE, "int8": Int8LinearMethod, "int4": lambda: Int4LinearMethod(group_size=16)}
IN, OUT = 64, 48


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
