"""Memory tiers: KV swap to a host pool, the host prefix-cache tier.

The host pool here is a second CPU tensor standing in for host memory. Every
engine test compares greedy tokens with the same engine unpressured (a pool
large enough that nothing is preempted or evicted). The random-workload test
replays the scheduler's block operations on a naive model of the pool's
contents (each slot holds the id of the token prefix whose K/V it stores) and
checks every scheduled sequence reads exactly its own prefix, plus the block
manager's invariants and that no device or host block leaks.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from safetensors.torch import load_file

from pagellm import LLM, SamplingParams
from pagellm.analysis.memory import advise_offload, memory_breakdown
from pagellm.cli import main
from pagellm.config import EngineConfig
from pagellm.engine import kv_cache
from pagellm.engine.block_manager import BlockManager
from pagellm.engine.host_blocks import HostBlockPool, HostCopies
from pagellm.engine.scheduler import Scheduler, SchedulerConfig
from pagellm.engine.sequence import Sequence
from pagellm.model.builder import build_model, random_weights
from pagellm.model.model_spec import load_model_config
from pagellm.model.offload import OFFLOAD_FILE
from pagellm.server.metrics import ServerMetrics
from pagellm.sizing import Precision
from test_block_manager import advance, check_invariants
from tiny_models import make_tiny_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(length + 3 * i)] for i in range(n)]


def tokens(llm: LLM, batch, params=GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(batch, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """The unpressured engine's greedy tokens for the prompts the tests use."""
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=512)
    return {"swap": tokens(llm, prompts(6, 20)), "shared": tokens(llm, shared_prefix_prompts())}


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_forced_swaps_give_unpressured_greedy_tokens(tiny_llama, reference, prefix_caching, monkeypatch):
    # 6 sequences of 20..35 + 24 tokens (11..15 blocks each) in 40 blocks: preemption in most steps.
    monkeypatch.setattr(kv_cache, "GROUP_COPY_BYTES", 1024)   # each layer its own group (1,024 bytes a block)
    monkeypatch.setattr(kv_cache, "STAGE_BYTES", 3 * 1024)   # copies staged 3 blocks at a time
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=16,
              swap_space=1 << 20, swap_min_tokens=1, enable_prefix_caching=prefix_caching)
    assert tokens(llm, prompts(6, 20)) == reference["swap"]
    stats = llm.engine.stats()
    assert stats["num_swapped_out"] > 0 and stats["num_swapped_out"] == stats["num_preemptions"]
    assert stats["kv_bytes_to_host"] > 0 and stats["kv_bytes_to_device"] > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.host.num_held == 0


def test_forced_swaps_with_speculation_give_unpressured_greedy_tokens(tiny_llama, reference):
    """Lookahead slots beside swapped blocks: n-gram proposals on sequences that swap out and back."""
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=16,
              swap_space=1 << 20, swap_min_tokens=1, speculative_method="ngram", speculative_max_batch=64)
    assert tokens(llm, prompts(6, 20)) == reference["swap"]
    stats = llm.engine.stats()
    assert stats["num_swapped_out"] > 0 and stats["spec_num_proposed"] > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.host.num_held == 0


def test_forced_swaps_move_the_scales_of_an_int8_cache(tiny_llama):
    """A quantized cache's blocks come back with their own scales (stale scales would change the tokens)."""
    unpressured = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=512, kv_cache_dtype="int8")
    expected = tokens(unpressured, prompts(6, 20))
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=16,
              swap_space=1 << 20, swap_min_tokens=1, enable_prefix_caching=False, kv_cache_dtype="int8")
    assert tokens(llm, prompts(6, 20)) == expected
    assert llm.engine.stats()["num_swapped_out"] > 0


def test_full_host_pool_falls_back_to_recompute(tiny_llama, reference):
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=16,
              swap_space=12 * 2048, swap_min_tokens=1, enable_prefix_caching=False)
    # 2048 bytes a block (2 layers x K, V x 2 heads x 16 x fp32 x 4 tokens): 12 blocks, room for one preempted
    # sequence (11..15 blocks each), not for two
    assert llm.engine.block_manager.host.num_blocks == 12
    assert tokens(llm, prompts(6, 20)) == reference["swap"]
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > stats["num_swapped_out"] > 0   # some swapped, the others recomputed


def test_short_contexts_recompute_by_the_cost_rule(tiny_llama, reference):
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=16,
              swap_space=1 << 20, swap_min_tokens=10_000)
    assert tokens(llm, prompts(6, 20)) == reference["swap"]
    assert llm.engine.stats()["num_preemptions"] > 0 and llm.engine.stats()["num_swapped_out"] == 0


# ---- the scheduler's block operations replayed on a model of the pool -----------------------------------

workload = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16),
    "num_blocks": st.integers(6, 30),
    "num_host_blocks": st.integers(0, 40),
    "block_size": st.sampled_from([1, 2, 4]),
    "budget": st.integers(2, 24),
    "max_seqs": st.integers(2, 6),
    "num_requests": st.integers(4, 14),
    "prefix_caching": st.booleans(),
    "sliding_window": st.sampled_from([None, None, 3, 7]),
    "swap_min_tokens": st.sampled_from([1, 1, 6]),
    "abort_rate": st.floats(0, 0.05),
})


def check_host(host: HostBlockPool, seqs: list[Sequence]) -> None:
    held = [b for s in seqs for b in s.host_block_table if b is not None]
    states = host.free_blocks + list(host.cached.values()) + held
    assert sorted(states) == list(range(host.num_blocks)), "a host block is lost or in two states"


@settings(max_examples=300, deadline=None)
@given(workload)
def test_swap_storm_keeps_contents_and_frees_every_block(w):
    rng = random.Random(w["seed"])
    size = w["block_size"]
    null_block = w["num_blocks"] if w["sliding_window"] else None
    host = HostBlockPool(w["num_host_blocks"])
    bm = BlockManager(w["num_blocks"], size, w["prefix_caching"], w["sliding_window"], null_block, host)
    scheduler = Scheduler(SchedulerConfig(w["max_seqs"], w["budget"], 10_000, w["swap_min_tokens"]), bm)
    device = [[None] * size for _ in range(w["num_blocks"] + 1)]   # slot -> the token prefix its K/V belong to
    host_pool = [[None] * size for _ in range(w["num_host_blocks"])]
    capacity = w["num_blocks"] * size
    live: list[Sequence] = []
    in_flight: list[tuple[int, int, list]] = []   # write-backs started: (device, host, its contents then)

    def write_back(copies: list[tuple[int, int, list]]) -> list:
        """The write-backs land: each reads its device block as late as its step allows (unless that differs
        from what it held when started: a step wrote it without waiting) and writes its host block."""
        for dev, hst, contents in copies:
            assert device[dev] == contents, "a step wrote a block whose write-back it did not wait for"
            host_pool[hst] = contents
        return []
    arrivals: dict[int, list[Sequence]] = {}   # step -> requests arriving then (later ones may hit evicted prefixes)
    shared = [rng.randrange(20) for _ in range(32)]
    for i in range(w["num_requests"]):
        max_tokens = rng.randrange(1, 16)
        length = rng.randrange(1, max(2, capacity // 2))
        if length + max_tokens <= capacity:
            prompt = (shared[:rng.randrange(33)] + [rng.randrange(20) for _ in range(length)])[:length]
            live.append(Sequence(i, str(i), 0, prompt, SamplingParams(max_tokens=max_tokens), 0, 0.0))
            arrivals.setdefault(rng.randrange(40), []).append(live[-1])
    for step in range(3000):
        for seq in arrivals.pop(step, []):
            scheduler.add(seq)
        if not (scheduler.waiting or scheduler.running or arrivals):
            break
        batch = scheduler.schedule()
        assert batch.seqs or batch.preempted or not (scheduler.waiting or scheduler.running), "scheduler stalled"
        if not batch:
            continue
        copies = host.take_swaps()
        if copies.wait_write_back or copies.out:   # waited for, or ahead of these swap-outs on their stream
            in_flight = write_back(in_flight)
        for dev, hst in copies.out:   # the worker's order: out, in, copy-on-write, forward
            host_pool[hst] = list(device[dev])
        for dev, hst in copies.in_:
            device[dev] = list(host_pool[hst])
        for src, dst in bm.take_pending_copies():
            device[dst] = list(device[src])
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                device[seq.block_table[pos // size]][pos % size] = tuple(seq.token_ids[:pos + 1])
        in_flight += [(dev, hst, list(device[dev])) for dev, hst in copies.write_back]   # read late or now
        for seq, n in zip(batch.seqs, batch.num_new_tokens):   # attention reads every visible position
            window = w["sliding_window"]
            first = max(0, seq.num_computed_tokens - window + 1) if window else 0
            for pos in range(first, seq.num_computed_tokens + n):
                assert device[seq.block_table[pos // size]][pos % size] == tuple(seq.token_ids[:pos + 1])
        advance(scheduler, batch, rng)
        for seq in list(scheduler.running) + list(scheduler.waiting.values()):
            if rng.random() < w["abort_rate"]:
                scheduler.finish(seq)
        for seq in batch.seqs:
            if not seq.finished:
                bm.free_outside_window(seq)
        check_invariants(bm, [s for s in live if not s.finished])
        check_host(host, [s for s in live if not s.finished])
    write_back(in_flight)
    assert not (scheduler.waiting or scheduler.running)
    assert bm.num_free_blocks == bm.num_blocks and all(r == 0 for r in bm.ref_counts)
    host.take_swaps()
    assert len(host.free_blocks) + len(host.cached) == host.num_blocks


# ---- the host prefix-cache tier ------------------------------------------------------------------------

def shared_prefix_prompts() -> list[list[int]]:
    rng = random.Random(7)
    prefix = [rng.randrange(3, 300) for _ in range(64)]
    return [prefix + [rng.randrange(3, 300) for _ in range(5)] for _ in range(2)]


def fill_device_cache(llm: LLM) -> None:
    """Unrelated prompts that take every block of the 40-block pool, evicting what the prefix cache held."""
    llm.generate(prompts(3, 60, seed=3), SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)


@pytest.mark.parametrize("swap_space", [None, 1 << 20])
def test_prefix_evicted_to_host_is_restored_not_recomputed(tiny_llama, reference, swap_space):
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, swap_space=swap_space)
    first, second = shared_prefix_prompts()   # 64 shared tokens (16 blocks), then 5 of their own
    assert tokens(llm, [first]) == reference["shared"][:1]
    fill_device_cache(llm)
    steps: list[HostCopies] = []
    if swap_space is not None:   # record each step's copies
        take = llm.engine.block_manager.host.take_swaps
        llm.engine.block_manager.host.take_swaps = lambda: steps.append(take()) or steps[-1]
    before = llm.engine.scheduler.stats.num_prefill_tokens
    assert tokens(llm, [second]) == reference["shared"][1:]
    computed = llm.engine.scheduler.stats.num_prefill_tokens - before
    stats = llm.engine.stats()
    if swap_space is None:   # the prefix was evicted: every prompt token is computed again
        assert computed == 69
    else:                    # 16 blocks come back from the host; only the 5 tokens after them are computed
        assert computed == 5 and stats["host_prefix_hit_tokens"] == 64
        restore = next(copies for copies in steps if copies.in_)   # the blocks it took were on the host already
        assert len(restore.in_) == 16 and restore.out == []
        assert stats["kv_bytes_to_device"] == 16 * 2048 and stats["kv_bytes_to_host"] >= 16 * 2048
        scraped = generate_latest(ServerMetrics(llm.engine.stats).registry).decode()
        assert "pagellm:host_prefix_cache_hit_tokens_total 64.0" in scraped
        assert f"pagellm:kv_bytes_to_device_total {16 * 2048:.1f}" in scraped


def test_freed_cached_blocks_are_written_back_once_ahead_of_their_eviction():
    """Closed-form counts: n freed cached blocks queue exactly n lazy copies to the host; matched and freed
    again, none (and no wait); evicted later, none, the step waiting for the write-backs it overwrites;
    restored, n copies in and none out; freed and handed out again before the next step, n ordinary
    swap-outs (their copies must precede that step's writes)."""
    n, size = 5, 4
    host = HostBlockPool(4 * n)
    bm = BlockManager(2 * n, size, host=host)
    rng = random.Random(0)
    prefix, other, third = ([rng.randrange(100) for _ in range(k * size)] for k in (n, 2 * n, n))

    def allocated(i: int, prompt: list[int]) -> Sequence:
        seq = Sequence(i, str(i), 0, prompt, SamplingParams(max_tokens=1), 0, 0.0)
        bm.allocate(seq, seq.num_tokens - bm.match_prefix(seq))
        return seq

    first = allocated(0, prefix)
    blocks = list(first.block_table)
    assert host.take_swaps() == HostCopies.none()
    bm.free(first)
    copies = host.take_swaps()
    assert copies.out == copies.in_ == [] and sorted(d for d, _ in copies.write_back) == sorted(blocks)
    on_host = {d: h for d, h in copies.write_back}
    bm.free(allocated(1, prefix + [1]))   # a device hit of all n blocks, freed again
    assert host.take_swaps() == HostCopies.none()
    big = allocated(2, other)   # takes every block: the n cached ones leave the device without a copy,
    assert host.take_swaps() == HostCopies([], [], [], wait_write_back=True)   # once their write-backs are done
    bm.free(big)
    assert len(host.take_swaps().write_back) == 2 * n
    restored = allocated(3, prefix + [2])
    copies = host.take_swaps()
    assert copies.out == copies.write_back == [] and sorted(h for _, h in copies.in_) == sorted(on_host.values())
    assert copies.wait_write_back   # into blocks of big's write-backs
    bm.free(restored)
    freed = allocated(4, third)
    blocks = set(freed.block_table)
    bm.free(freed)
    allocated(5, other[::-1])   # hands every block out again in the same step
    copies = host.take_swaps()
    assert copies.write_back == [] and {d for d, _ in copies.out} == blocks
    small = HostBlockPool(2)
    small.write_ahead(7, 70)   # device block 7 (hash 70) to host block 1, then 8 to 0
    small.write_ahead(8, 80)
    small.copy_out(9, small.take())   # a swap-out evicts the older cached copy: its lazy copy is dropped
    assert small.take_swaps() == HostCopies([(9, 1)], [], [(8, 0)])


# ---- weight offload ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("five-layers"), num_hidden_layers=5)


def layer_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.layers[0].parameters())


@pytest.mark.parametrize("quantization,disk", [(None, False), ("int8", True)])
def test_streamed_layers_give_the_resident_models_greedy_tokens(five_layers, quantization, disk, tmp_path):
    resident = LLM(str(five_layers), dtype="float32", block_size=4, num_kv_blocks=64, quantization=quantization)
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = tokens(resident, prompts(2, 9), short)
    layer = layer_bytes(resident)
    # layers 1..4 in host memory (or a file), taking turns in 2 device buffers
    llm = LLM(str(five_layers), dtype="float32", block_size=4, num_kv_blocks=64, quantization=quantization,
              cpu_offload_memory=4 * layer - 1, disk_offload=str(tmp_path) if disk else None)
    offload = llm.engine.runner.offload
    assert offload.layers == list(llm.engine.runner.model.layers)[1:]
    assert tokens(llm, prompts(2, 9), short) == expected
    for params, host in zip(offload.params, offload.host):   # the forward read buffers, never the host copy
        assert all(p.data_ptr() != host[name].data_ptr() for name, p in params.items())
    if disk:   # the layers were loaded into the file's mapping: a safetensors file holding their values
        on_disk = load_file(str(tmp_path / OFFLOAD_FILE))
        assert len(on_disk) == sum(len(host) for host in offload.host)
        assert all(torch.equal(on_disk[f"{i}.{name}"], t) for i, host in enumerate(offload.host)
                   for name, t in host.items())
    memory = llm.engine.memory
    assert (memory.host_weights_bytes, memory.offloaded_layers) == (4 * layer, 4)
    assert memory.weights_bytes == resident.engine.memory.weights_bytes - 2 * layer
    assert memory.offload_tier == ("disk" if disk else "host") and "4 layers streamed" in memory.summary()


def test_offloaded_layers_are_built_in_their_final_home(five_layers):
    # The meta device stands in for the GPU: a device-resident tensor never holds host memory, so the host
    # holds exactly the 2 offloaded layers, filled from the stream (never a copy of the whole model).
    config = load_model_config(str(five_layers))
    weights = dict(random_weights(config, torch.float32, "cpu"))
    model = build_model(config, torch.float32, "meta", weights.items(), host_layers=2)
    on_host = {name: p for name, p in model.named_parameters() if p.device.type == "cpu"}
    assert all(name.startswith(("layers.3.", "layers.4.")) for name in on_host)
    assert sum(p.numel() * p.element_size() for p in on_host.values()) == \
        2 * sum(t.numel() * t.element_size() for name, t in weights.items() if ".layers.0." in name)
    assert torch.equal(on_host["layers.4.self_attn.qkv_proj.weight"][:config.q_size],
                       weights["model.layers.4.self_attn.q_proj.weight"])
    assert torch.equal(on_host["layers.3.mlp.down_proj.weight"], weights["model.layers.3.mlp.down_proj.weight"])


def test_disk_offloaded_layers_are_loaded_into_their_file(five_layers, tmp_path):
    # With a file as their home, the offloaded layers are views of its mapping before any weight is read: the
    # loaders' writes are the file's contents (nothing saves it afterwards), a valid safetensors file.
    config = load_model_config(str(five_layers))
    weights = dict(random_weights(config, torch.float32, "cpu"))
    model = build_model(config, torch.float32, "meta", weights.items(), host_layers=2, host_file=tmp_path / "l.st")
    on_disk = load_file(str(tmp_path / "l.st"))
    on_host = {name: p for name, p in model.named_parameters() if p.device.type == "cpu"}
    assert len(on_disk) == len(on_host)
    assert torch.equal(on_disk["1.mlp.down_proj.weight"], weights["model.layers.4.mlp.down_proj.weight"])
    assert torch.equal(on_disk["0.self_attn.qkv_proj.weight"][:config.q_size],
                       weights["model.layers.3.self_attn.q_proj.weight"])
    on_host["layers.4.mlp.down_proj.weight"].data.zero_()   # the parameter is the file's page, not a copy of it
    assert not load_file(str(tmp_path / "l.st"))["1.mlp.down_proj.weight"].any()


def test_auto_offload_takes_the_fewest_layers_that_fit(five_layers):
    resident = LLM(str(five_layers), dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=128)
    weights, layer = resident.engine.memory.weights_bytes, layer_bytes(resident)
    settings = dict(dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=64, max_num_seqs=4)
    probe = LLM(str(five_layers), gpu_memory=1 << 30, **settings).engine.memory
    reserve = probe.activation_bytes + 128 * probe.kv_bytes_per_token   # activations + one full-length sequence
    for wanted in (3, 4):   # a budget that 3 (then 4) offloaded layers just meet: k layers save k - 2
        budget = reserve + weights - (wanted - 2) * layer
        memory = LLM(str(five_layers), gpu_memory=budget, cpu_offload_memory="auto", **settings).engine.memory
        assert memory.offloaded_layers == wanted
        assert memory.weights_bytes + reserve <= budget < memory.weights_bytes + reserve + layer


# ---- the analyzer: every tier, and the offload advice ---------------------------------------------------

def test_memory_measure_shows_every_tier_as_predicted(five_layers, capsys):
    c = load_model_config(str(five_layers))
    layer = 4 * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)   # fp32 block: linears + 2 norms
    per_block = 16 * 2 * 5 * c.num_key_value_heads * c.head_dim * 4
    assert main(["memory", str(five_layers), "--dtype", "fp32", "--batch-size", "2", "--context-len", "64",
                 "--cpu-offload-memory", str(3 * layer), "--swap-space", str(10 * per_block + 1),
                 "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    predicted, measured = out["memory"], out["measured"]
    assert predicted["offloaded_layers"] == measured["offloaded_layers"] == 3
    assert predicted["host_weights_bytes"] == measured["host_weights_bytes"] == 3 * layer
    assert predicted["weights_bytes"] == measured["weights_bytes"] == c.num_parameters * 4 - layer
    assert predicted["host_kv_bytes"] == measured["host_kv_cache_bytes"] == 10 * per_block


def test_offload_advice_streams_the_fewest_layers_that_fit():
    c = load_model_config("llama-3-70b")
    memory, context = 24 * 2**30, 4096
    advice = advise_offload(c, memory, 1, context, Precision())
    assert [o.w_bits for o in advice.options] == [16, 8, 4]
    assert advice.recommended.w_bits == 4   # the fewest bytes cross the host link every step
    for option in advice.options:
        p = Precision(w_bits=option.w_bits)
        layer = option.host_weights_bytes / option.offloaded_layers

        def device_total(k: int) -> float:   # one prefill chunk of 2048 tokens in flight, as the advisor assumes
            return memory_breakdown(c, 1, context, p, offload_bytes=k * layer).total_bytes
        assert device_total(option.offloaded_layers) <= memory < device_total(option.offloaded_layers - 1)
    small = advise_offload(load_model_config("llama-3-8b"), memory, 1, context, Precision())
    assert small.recommended.w_bits == 16 and small.recommended.offloaded_layers == 0


def test_disk_offload_needs_cpu_offload_memory():
    with pytest.raises(ValueError, match="cpu_offload_memory"):
        EngineConfig(model="tiny", disk_offload="/tmp")


def converse(llm: LLM, documents: list[list[int]], questions: list[list[list[int]]], answer: int) -> list:
    """Turn by turn, every conversation appends its question and the model's greedy answer."""
    contexts = [list(document) for document in documents]
    answers = []
    for turn_questions in questions:
        for context, question in zip(contexts, turn_questions):
            context.extend(question)
        replies = tokens(llm, contexts, SamplingParams(temperature=0, max_tokens=answer, ignore_eos=True))
        for context, reply in zip(contexts, replies):
            context.extend(reply)
        answers.append(replies)
    return answers


def test_conversations_larger_than_the_pool_come_back_from_the_host_tier(tiny_llama):
    """4 conversations x 3 turns: 40-token documents, 4-token questions, 8-token answers (block size 4): at the last
    turn the contexts need 4 x 76 tokens = 76 blocks, 1.9x the 40-block pool, so each turn finds the others'
    K/V evicted. With a host tier only what is new since a conversation's last full block is computed."""
    documents = prompts(4, 40, seed=11)
    rng = random.Random(12)
    questions = [[[rng.randrange(3, 300) for _ in range(4)] for _ in documents] for _ in range(3)]
    unpressured = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=512, enable_prefix_caching=False)
    expected = converse(unpressured, documents, questions, answer=8)
    computed = {}
    for swap_space in (None, 1 << 20):
        llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=40, swap_space=swap_space)
        assert converse(llm, documents, questions, answer=8) == expected
        computed[swap_space] = llm.engine.scheduler.stats.num_prefill_tokens
    first_turn = sum(len(d) + 4 for d in documents)
    # recompute only: the evicted contexts (all but what the device still holds) are computed again each turn
    assert computed[None] > first_turn + 2 * 4 * 36
    # host tier: each later turn at most the question, the answer and a partial block (3 tokens) anew
    assert computed[1 << 20] <= first_turn + 2 * 4 * (4 + 8 + 3)
