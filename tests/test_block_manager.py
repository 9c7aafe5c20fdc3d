"""Block manager and scheduler invariants under random workloads, without a model:
a fake step appends a random token to every sequence that completes its tokens."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.engine.block_manager import BlockManager
from pagellm.engine.scheduler import Scheduler, SchedulerConfig
from pagellm.engine.sequence import Sequence
from pagellm.sampling_params import SamplingParams


def check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    holders = [0] * bm.num_blocks
    for seq in seqs:
        assert len(set(seq.block_table)) == len(seq.block_table), "a sequence holds a block twice"
        for block in seq.block_table:
            holders[block] += 1
    assert holders == bm.ref_counts
    free = set(bm.free_queue)
    assert len(free) == len(bm.free_queue)
    for block, refs in enumerate(bm.ref_counts):
        assert (refs == 0) == (block in free)
    if not bm.enable_prefix_caching:
        assert max(holders, default=0) <= 1, "a block is owned twice"
    for block_hash, block in bm.cached_blocks.items():
        assert bm.block_hash[block] == block_hash


workload = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16),
    "num_blocks": st.integers(4, 40),
    "block_size": st.sampled_from([1, 2, 4, 8]),
    "budget": st.integers(1, 32),
    "max_seqs": st.integers(1, 8),
    "num_requests": st.integers(1, 12),
    "abort_rate": st.floats(0, 0.2),
    "prefix_caching": st.booleans(),
})


@settings(max_examples=150, deadline=None)
@given(workload)
def test_random_workload_keeps_invariants_and_frees_everything(w):
    rng = random.Random(w["seed"])
    bm = BlockManager(w["num_blocks"], w["block_size"], w["prefix_caching"])
    scheduler = Scheduler(SchedulerConfig(w["max_seqs"], w["budget"], 10_000), bm)
    capacity = w["num_blocks"] * w["block_size"]
    live: list[Sequence] = []
    shared_prefix = [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
    for i in range(w["num_requests"]):
        max_tokens = rng.randrange(1, 10)
        prompt_len = rng.randrange(1, max(2, capacity - max_tokens))
        prompt = (shared_prefix + [rng.randrange(50) for _ in range(prompt_len)])[:prompt_len]
        if prompt_len + max_tokens > capacity:
            continue
        seq = Sequence(i, str(i), 0, prompt, SamplingParams(max_tokens=max_tokens), 0, 0.0)
        scheduler.add(seq)
        live.append(seq)
    for _ in range(2000):
        if not scheduler.has_unfinished():
            break
        batch = scheduler.schedule()
        assert batch.seqs, "scheduler stalled with work left"
        assert batch.num_tokens <= w["budget"]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + n
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(50))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    scheduler.finish(seq)
        for seq in list(scheduler.running) + list(scheduler.waiting):
            if rng.random() < w["abort_rate"]:
                scheduler.finish(seq)
        check_invariants(bm, [s for s in live if not s.finished])
    assert not scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(r == 0 for r in bm.ref_counts)


def test_prefix_cache_reuses_blocks_and_leaves_last_token_to_compute():
    bm = BlockManager(16, 4)
    first = Sequence(0, "a", 0, list(range(10)), SamplingParams(), 0, 0.0)
    bm.allocate(first, 10)
    first.num_computed_tokens = 10
    bm.cache_full_blocks(first)            # blocks 0..1 are full (8 tokens)
    second = Sequence(1, "b", 0, list(range(8)), SamplingParams(), 0, 0.0)
    assert bm.match_prefix(second) == 4    # 8 tokens: the last must be computed, so only block 0
    third = Sequence(2, "c", 0, list(range(9)), SamplingParams(), 0, 0.0)
    assert bm.match_prefix(third) == 8
    assert third.block_table == first.block_table[:2]
    assert bm.ref_counts[first.block_table[0]] == 3


def test_freed_cached_blocks_survive_until_reused_lru():
    bm = BlockManager(4, 2)
    seq = Sequence(0, "a", 0, [1, 2, 3, 4, 5], SamplingParams(), 0, 0.0)
    bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    bm.cache_full_blocks(seq)
    cached = dict(bm.cached_blocks)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and bm.cached_blocks == cached
    again = Sequence(1, "b", 0, [1, 2, 3, 4, 5], SamplingParams(), 0, 0.0)
    assert bm.match_prefix(again) == 4
    other = Sequence(2, "c", 0, [9] * 4, SamplingParams(), 0, 0.0)
    bm.allocate(other, 4)                   # takes the uncached block first, then an evictable one
    assert set(again.block_table).isdisjoint(other.block_table)
