"""The KV cache's copies to and from its host pool (``KVCache.swap``), on
their own: against a naive replay of the pairs one at a time, and (on CUDA,
where they run on side streams) against a step's layers that overwrite blocks
just swapped out and read blocks just swapped in.
"""
from __future__ import annotations

import random

import pytest
import torch

from pagellm.engine import kv_cache
from pagellm.model.context import ForwardContext


def host_parts(kv: kv_cache.KVCache, block: int) -> list[torch.Tensor]:
    """A host block's codes (and scales) as ``[2, layers, ...]``, read back from its layer groups."""
    return [torch.cat([t[block].transpose(0, 1) for t in group], dim=1)
            for group in (kv.host_pools, kv.host_scales) if group]


@pytest.mark.parametrize("storage", [torch.float32, torch.int8])
def test_grouped_run_copies_do_what_one_pair_at_a_time_does(storage, monkeypatch):
    """Against a naive replay (each pair in queue order, whole blocks): runs of
    consecutive host blocks cut by staging chunks, three layer groups, a host
    block written twice, one spilled and restored in the same call, a device
    block read by a swap-out and written by a swap-in, write-backs after the swap-ins; scales move with codes."""
    spec = kv_cache.KVCacheSpec(num_layers=5, num_kv_heads=2, head_dim=4, dtype=storage, block_size=2,
                                has_null_block=False)
    layer_block = spec.bytes_per_block // spec.num_layers
    monkeypatch.setattr(kv_cache, "GROUP_COPY_BYTES", 5 * layer_block // 3)   # groups of 1, 2, 2 layers
    monkeypatch.setattr(kv_cache, "STAGE_BYTES", 2 * 2 * layer_block)         # 2 blocks of a group at a time
    kv = kv_cache.KVCache(spec, num_blocks=12, device="cpu", num_host_blocks=12)
    assert kv.layer_groups == [(0, 1), (1, 3), (3, 5)]
    tensors = [t for t in (kv.pool, kv.scales) if t is not None]
    for t in tensors + kv.host_pools + kv.host_scales:
        t.copy_(torch.randint(-100, 100, t.shape).to(t.dtype))
    expected_host = {h: host_parts(kv, h) for h in range(12)}
    expected_pool = [t.clone() for t in tensors]
    out = list(zip(random.Random(0).sample(range(12), 8), [2, 3, 4, 7, 5, 6, 3, 9]))   # host block 3 twice
    in_ = {out[0][0]: 3, 1: 0, 10: 8, 11: 1}   # host block 3 read after both writes; out[0]'s block rewritten
    for d, h in out:
        expected_host[h] = [t[:, :, d].clone() for t in expected_pool]
    for d, h in in_.items():
        for t, part in zip(expected_pool, expected_host[h]):
            t[:, :, d] = part
    write_back = list(zip([d for d in range(2, 10) if d != out[0][0]][:2], [11, 10]))   # blocks no swap-in writes
    for d, h in write_back:
        expected_host[h] = [t[:, :, d].clone() for t in expected_pool]
    assert kv.swap(out, list(in_.items()), write_back) == []   # nothing to wait for on the CPU
    for h in range(12):
        assert all(torch.equal(a, b) for a, b in zip(host_parts(kv, h), expected_host[h]))
    assert all(torch.equal(t, expected) for t, expected in zip(tensors, expected_pool))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the copies run on side streams there")


@pytest.mark.parametrize("device,graph", [("cpu", False), pytest.param("cuda", False, marks=CUDA),
                                          pytest.param("cuda", True, marks=CUDA)])
def test_each_layer_of_the_step_waits_for_its_own_swaps(device, graph, monkeypatch):
    """A step's forward, layer by layer, behind asynchronous swaps (on CUDA 64
    MiB each way, so an unordered write would overtake the copies): it overwrites blocks
    just swapped out (their old K/V must reach the host first) and reads blocks
    just swapped in (their host contents must be there). ``graph``: the layers
    run as a CUDA graph captured before the swap, waiting for the KV cache's
    ``layer_ready`` events as the engine's graphs do."""
    spec = kv_cache.KVCacheSpec(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16,
                                has_null_block=False)   # 64 KiB a layer, 512 KiB a block
    monkeypatch.setattr(kv_cache, "GROUP_COPY_BYTES", 128 << 10)
    n = 128 if device == "cuda" else 8   # blocks each way
    kv = kv_cache.KVCache(spec, num_blocks=2 * n + 4, device=device, num_host_blocks=2 * n)
    assert kv.layer_groups == [(0, 2), (2, 4), (4, 6), (6, 8)]
    kv.pool.normal_()
    for host in kv.host_pools:
        host.normal_()
    out = list(zip(range(n), range(n, 2 * n)))
    in_ = list(zip(range(n, 2 * n), range(n)))
    old = kv.pool[:, :, :n].clone()
    incoming = torch.stack([host_parts(kv, h)[0] for _, h in in_], dim=2).to(device)
    seen = torch.empty_like(incoming)

    def step(ready: list[torch.cuda.Event | None]) -> None:
        for layer in range(spec.num_layers):   # what the attention layers do, through ForwardContext.kv
            ForwardContext(None, kv.layers, None, ready).kv(layer)
            kv.pool[:, layer, :n] = -1.0
            seen[:, layer] = kv.pool[:, layer, n:2 * n]

    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step(kv.layer_ready)
        torch.cuda.synchronize()
    ready = kv.swap(out, in_)
    assert sum(event is not None for event in ready) == (4 if device == "cuda" else 0)
    captured.replay() if graph else step(ready)
    if device == "cuda":
        torch.cuda.synchronize()   # before the CPU reads the host pool
    assert torch.equal(torch.stack([host_parts(kv, h)[0] for _, h in out], dim=2), old.cpu())
    assert torch.equal(seen, incoming)
