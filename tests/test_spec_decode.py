"""Speculative decoding (n-gram lookup and a draft model) on tiny random
models: the output must be what decoding without speculation gives — token for
token when greedy or when the proposal is one-hot (n-gram) under a seed, and
in distribution (a chi-squared test against the exact next-token law) when a
draft model samples. References: the same engine with speculation off, HF
transformers' distribution on the same weights, closed forms."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.spec.ngram import lookup
from pagellm.spec.proposal import Proposal
from tiny_models import make_tiny_hf_model

ARCHS = {
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
    "mistral-window": dict(arch="mistral", num_kv_heads=2, sliding_window=8),
}
# A pool of 20 blocks of 4 tokens for 5 sequences of up to 33 tokens forces preemption (10 blocks when a
# sliding window gives blocks back); 16 tokens a step forces chunked prefill.
SMALL_POOL = dict(dtype="float32", block_size=4, max_num_batched_tokens=16)


def repetitive_prompts(vocab: int) -> list[list[int]]:
    """Prompts that repeat a random motif, so prompt lookup finds matches."""
    g = torch.Generator().manual_seed(3)
    out = []
    for motif_len, repeats in ((3, 4), (5, 2), (2, 3), (4, 3), (6, 2)):
        motif = torch.randint(3, vocab, (motif_len,), generator=g).tolist()
        out.append(motif * repeats + motif[:1])
    return out


def token_ids(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_lookup_takes_the_longest_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(tokens, 2) == [7, 8]             # "2 3" last occurred before 7 8 (3-gram "5 2 3" never did)
    assert lookup(tokens + [7], 3) == [8, 5, 2]     # 3-gram "2 3 7"
    assert lookup([4, 5, 6], 3) == []               # no earlier occurrence of any suffix
    assert lookup([4, 5, 4], 3) == [5, 4]           # the continuation may run into the tail itself


class OracleProposer:
    """Proposes the reference continuation (decoding without speculation) with
    one token changed at a position that varies from step to step (sometimes
    none), and counts how many proposals verification must accept: those
    before the change."""

    def __init__(self, reference: dict[tuple, list[int]], vocab: int) -> None:
        self.reference, self.vocab, self.expected_accepted = reference, vocab, 0

    def propose(self, batch, running) -> None:
        for seq, k in batch.lookahead.items():
            done = seq.num_output_tokens
            truth = self.reference[tuple(seq.prompt_token_ids), seq.sample_index][done:done + k]
            wrong = (done + seq.seq_id) % (k + 1)
            tokens = [(t + 1) % self.vocab if i == wrong else t for i, t in enumerate(truth)]
            if tokens:
                batch.proposals[seq] = Proposal(tokens)
                self.expected_accepted += min(wrong, len(tokens))


def with_oracle(llm: LLM, prompts: list, outputs) -> OracleProposer:
    reference = {(tuple(o.prompt_token_ids), c.index): c.token_ids for o in outputs for c in o.outputs}
    llm.engine.proposer = OracleProposer(reference, llm.engine.model_config.vocab_size)
    return llm.engine.proposer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_identical_under_preemption_and_chunking(arch, tmp_path_factory):
    folder = make_tiny_hf_model(tmp_path_factory.mktemp(arch), **ARCHS[arch])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    pool = dict(SMALL_POOL, num_kv_blocks=10 if "sliding_window" in ARCHS[arch] else 20)
    off = LLM(str(folder), **pool)
    prompts = repetitive_prompts(off.engine.model_config.vocab_size)
    expected = off.generate(prompts, params)
    ngram = LLM(str(folder), speculative_method="ngram", num_speculative_tokens=3, **pool)
    assert token_ids(ngram.generate(prompts, params)) == token_ids(expected)
    assert ngram.engine.spec_stats.num_proposed > 0
    # Verification itself, with proposals that are often right: accepted exactly up to the first wrong one.
    oracle = with_oracle(ngram, prompts, expected)
    assert token_ids(ngram.generate(prompts, params)) == token_ids(expected)
    engine = ngram.engine
    assert engine.scheduler.stats.num_preemptions > 0 and engine.scheduler.stats.num_chunked_prefills > 0
    accepted = engine.spec_stats.num_accepted
    assert accepted == oracle.expected_accepted and 0 < accepted < engine.spec_stats.num_proposed
    assert engine.block_manager.num_free_blocks == pool["num_kv_blocks"]   # every slot given back


def test_sampled_tokens_logprobs_and_n_identical(tiny_llama):
    """A one-hot proposal is accepted iff it is the token decoding would draw, so
    with a seed the tokens are those drawn without speculation."""
    params = SamplingParams(temperature=0.8, top_k=20, n=3, seed=11, max_tokens=16, logprobs=3, ignore_eos=True,
                            presence_penalty=0.2)
    kw = dict(dtype="float32", block_size=4, num_kv_blocks=128)
    off = LLM(str(tiny_llama), **kw)
    prompts = repetitive_prompts(off.engine.model_config.vocab_size)[:3]
    expected = off.generate(prompts, params)
    on = LLM(str(tiny_llama), speculative_method="ngram", **kw)
    oracle = with_oracle(on, prompts, expected)
    got = on.generate(prompts, params)
    assert token_ids(got) == token_ids(expected)
    assert on.engine.spec_stats.num_accepted == oracle.expected_accepted > 0
    for a, b in zip(got, expected):
        for x, y in zip(a.outputs, b.outputs):
            assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, abs=1e-3)
            assert [sorted(d) for d in x.logprobs] == [sorted(d) for d in y.logprobs]   # the same top tokens


def test_stop_strings_and_max_tokens(tiny_llama):
    greedy = dict(temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", block_size=4, num_kv_blocks=64)
    off = LLM(str(tiny_llama), **kw)
    on = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=5, **kw)
    prompt = "def add(a, b):\n    return a + b\n"
    full = off.generate(prompt, SamplingParams(max_tokens=30, **greedy))
    with_oracle(on, [prompt], full)
    text = full[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cases = [SamplingParams(max_tokens=n, **greedy) for n in (1, 2, 7, 30)]
    if stop.strip():
        cases.append(SamplingParams(max_tokens=30, stop=[stop], **greedy))
    for params in cases:
        a, b = on.generate(prompt, params)[0].outputs[0], off.generate(prompt, params)[0].outputs[0]
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                          b.stop_reason)
    assert on.engine.spec_stats.num_accepted > 0


def chained_block_hashes(tokens: list[int], block_size: int) -> set[int]:
    """The prefix-cache names of the full blocks of ``tokens`` (the block manager's chained hash)."""
    hashes, parent = set(), None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        hashes.add(parent)
    return hashes


def test_unverified_tokens_never_enter_the_prefix_cache(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(dtype="float32", block_size=4, num_kv_blocks=128)
    fresh = LLM(str(tiny_llama), enable_prefix_caching=False, **kw)
    prompts = repetitive_prompts(fresh.engine.model_config.vocab_size)
    on = LLM(str(tiny_llama), speculative_method="ngram", **kw)
    with_oracle(on, prompts, fresh.generate(prompts, params))
    outputs = on.generate(prompts, params)
    assert 0 < on.engine.spec_stats.num_accepted < on.engine.spec_stats.num_proposed   # K/V of rejected ones written
    verified = set().union(*(chained_block_hashes(o.prompt_token_ids + o.outputs[0].token_ids, 4) for o in outputs))
    assert set(on.engine.block_manager.cached_blocks) <= verified
    # The cached blocks hold the right K/V: continuing from them gives what a fresh engine computes.
    longer = [o.prompt_token_ids + o.outputs[0].token_ids for o in outputs]
    expected = fresh.generate(longer, params)
    with_oracle(on, longer, expected)
    hits = on.engine.block_manager.stats.hit_tokens
    assert token_ids(on.generate(longer, params)) == token_ids(expected)
    assert on.engine.block_manager.stats.hit_tokens - hits >= sum(len(p) for p in longer) // 2
