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
    holders = [0] * len(bm.ref_counts)
    for seq in seqs:
        table = [b for b in seq.block_table if b != bm.null_block]
        assert len(set(table)) == len(table), "a sequence holds a block twice"
        for block in table:
            holders[block] += 1
        if bm.sliding_window:   # nothing the next token could still see has been given back
            visible_from = max(0, seq.num_computed_tokens - bm.sliding_window + 1) // bm.block_size
            assert bm.null_block not in seq.block_table[visible_from:]
    assert holders == bm.ref_counts
    free = set(bm.free_queue)
    assert len(free) == len(bm.free_queue)
    for block, refs in enumerate(bm.ref_counts[:bm.num_blocks]):
        assert (refs == 0) == (block in free)
    assert bm.null_block not in free
    if not bm.enable_prefix_caching:   # without the cache only forks of one request share
        owners: dict[int, str] = {}
        for seq in seqs:
            for block in seq.block_table:
                if block == bm.null_block:
                    continue
                assert owners.setdefault(block, seq.request_id) == seq.request_id, "a block is owned twice"
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
    "fork_rate": st.floats(0, 0.3),
    "sliding_window": st.sampled_from([None, 1, 3, 7]),
    "prefill_cap": st.sampled_from([None, 1, 2, 5]),
})


def fork(bm: BlockManager, scheduler: Scheduler, parent: Sequence, seq_id: int) -> Sequence:
    """A sibling sharing the parent's blocks, recomputing its last prompt token (as n > 1 does)."""
    child = Sequence(seq_id, parent.request_id, 1, parent.prompt_token_ids, parent.params, 0, 0.0)
    bm.fork(parent, child, child.num_tokens - 1)
    scheduler.add(child)
    return child


def advance(scheduler: Scheduler, batch, rng: random.Random) -> None:
    """The fake step: each scheduled sequence computes its tokens; one that has computed all of
    them appends a random token and finishes once it has its ``max_tokens``."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(rng.randrange(50))
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq)


@settings(max_examples=150, deadline=None)
@given(workload)
def test_random_workload_keeps_invariants_and_frees_everything(w):
    rng = random.Random(w["seed"])
    null_block = w["num_blocks"] if w["sliding_window"] else None   # the KV cache's spare block past the pool
    bm = BlockManager(w["num_blocks"], w["block_size"], w["prefix_caching"], w["sliding_window"], null_block)
    scheduler = Scheduler(SchedulerConfig(w["max_seqs"], w["budget"], 10_000,
                                          max_prefill_tokens_with_decodes=w["prefill_cap"]), bm)
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
        if not (scheduler.waiting or scheduler.running):
            break
        decoding = any(seq.num_uncomputed_tokens == 1 for seq in scheduler.running)
        batch = scheduler.schedule()
        assert batch.seqs or batch.preempted, "scheduler stalled with work left"
        assert batch.num_tokens <= w["budget"]
        if decoding and w["prefill_cap"] is not None:
            assert sum(n for n in batch.num_new_tokens if n > 1) <= w["prefill_cap"]
            # what EngineConfig.graph_tokens relies on: no step beside decodes outgrows the CUDA graphs
            assert batch.num_tokens <= w["prefill_cap"] + w["max_seqs"]
        for src, dst in bm.take_pending_copies():
            assert bm.ref_counts[dst] == 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + n
            index = seq.num_computed_tokens // bm.block_size
            write_block = seq.block_table[index]
            if bm.ref_counts[write_block] > 1:   # only a block published for exactly these tokens
                assert bm.block_hash[write_block] == bm._hash_block(seq, index), "writing into a shared block"
        advance(scheduler, batch, rng)
        for seq in list(scheduler.running) + list(scheduler.waiting.values()):
            if rng.random() < w["abort_rate"]:
                scheduler.finish(seq)
            elif (seq in batch.seqs and seq.num_output_tokens == 1 and len(live) < 2 * w["num_requests"]
                  and rng.random() < w["fork_rate"]):   # as the engine does: right after the prompt
                live.append(fork(bm, scheduler, seq, len(live)))
        for seq in batch.seqs:
            if not seq.finished:
                bm.free_outside_window(seq)
        check_invariants(bm, [s for s in live if not s.finished])
    assert not (scheduler.waiting or scheduler.running)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(r == 0 for r in bm.ref_counts)


def test_prompt_chunks_beside_decodes_are_capped_and_take_the_budget_alone():
    """A 5,000-token prompt arriving while one sequence decodes: 1,000 prompt tokens a step (the
    cap) for 5 steps, the decode in every one of them; alone, the same prompt takes one step."""
    def steps_to_prefill(with_decode: bool) -> list[tuple[int, int]]:
        bm = BlockManager(1024, 16, enable_prefix_caching=False)
        scheduler = Scheduler(SchedulerConfig(8, 8192, 10_000, max_prefill_tokens_with_decodes=1000), bm)
        rng = random.Random(0)
        if with_decode:
            decoder = Sequence(0, "d", 0, [1, 2, 3], SamplingParams(max_tokens=100), 0, 0.0)
            scheduler.add(decoder)
            advance(scheduler, scheduler.schedule(), rng)   # its prompt: now it decodes
        prompt = Sequence(1, "p", 0, [rng.randrange(50) for _ in range(5000)], SamplingParams(max_tokens=5), 0, 0.0)
        scheduler.add(prompt)
        shape = []
        while prompt.num_output_tokens == 0:
            batch = scheduler.schedule()
            shape.append((len(batch.seqs), dict(zip(batch.seqs, batch.num_new_tokens))[prompt]))
            advance(scheduler, batch, rng)
        return shape

    assert steps_to_prefill(with_decode=True) == [(2, 1000)] * 5
    assert steps_to_prefill(with_decode=False) == [(1, 5000)]


def test_prefix_cache_reuses_blocks_and_leaves_last_token_to_compute():
    bm = BlockManager(16, 4)
    first = Sequence(0, "a", 0, list(range(10)), SamplingParams(), 0, 0.0)
    bm.allocate(first, 10)                 # blocks 0..1 will be full (8 tokens): published
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
    cached = dict(bm.cached_blocks)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and bm.cached_blocks == cached and len(cached) == 2
    again = Sequence(1, "b", 0, [1, 2, 3, 4, 5], SamplingParams(), 0, 0.0)
    assert bm.match_prefix(again) == 4
    other = Sequence(2, "c", 0, [9] * 4, SamplingParams(), 0, 0.0)
    bm.allocate(other, 4)                   # takes the uncached block first, then an evictable one
    assert set(again.block_table).isdisjoint(other.block_table)


def test_copy_on_write_copies_a_shared_block_only_when_written():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    parent = Sequence(0, "a", 0, list(range(6)), SamplingParams(), 0, 0.0)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = Sequence(1, "a", 1, list(range(6)), SamplingParams(), 0, 0.0)
    bm.fork(parent, child, 5)
    assert child.block_table == parent.block_table and bm.num_used_blocks == 2
    bm.allocate(child, 1)                  # writes position 5, inside the shared second block
    assert bm.take_pending_copies() == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0] and bm.ref_counts[parent.block_table[0]] == 2
    parent.append_token(9)
    bm.allocate(parent, 1)                 # parent is now the block's only holder: no copy
    assert bm.take_pending_copies() == [] and bm.num_used_blocks == 3


def test_a_preempted_sequence_is_not_preempted_again_before_it_decodes():
    """Three 24-token prompts + 32 tokens each in 18 blocks of 4, 16 tokens a step, recompute only:
    the preempted sequences come back when their whole context fits, so none is preempted again
    before it decoded a new token (admitted as soon as its first 16-token chunk fit, one was: 16 times
    here, recomputing 404 prompt tokens instead of 150)."""
    bm = BlockManager(18, 4, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(8, 16, 10_000), bm)
    for i in range(3):
        scheduler.add(Sequence(i, str(i), 0, [i + 1] * 24, SamplingParams(max_tokens=32), 0, 0.0))
    rng = random.Random(0)
    outputs_at_preemption: dict[int, int] = {}
    while scheduler.waiting or scheduler.running:
        batch = scheduler.schedule()
        for seq in batch.preempted:
            assert outputs_at_preemption.get(seq.seq_id) != seq.num_output_tokens, "preempted again, no progress"
            outputs_at_preemption[seq.seq_id] = seq.num_output_tokens
        advance(scheduler, batch, rng)
        check_invariants(bm, list(scheduler.running) + list(scheduler.waiting.values()))
    assert scheduler.stats.num_preemptions > 0
