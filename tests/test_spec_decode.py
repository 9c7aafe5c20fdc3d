"""Speculative decoding (n-gram lookup and a draft model) on tiny random
models: the output must be what decoding without speculation gives — token for
token when greedy or when the proposal is one-hot (n-gram) under a seed, and
in distribution (a chi-squared test against the exact next-token law) when a
draft model samples. References: the same engine with speculation off, HF
transformers' distribution on the same weights, closed forms."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.engine.scheduler import lookahead_for_batch
from pagellm.model.layers import DenseLinearMethod, Linear
from pagellm.server.metrics import ServerMetrics
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

    def retain(self, running) -> None:
        pass

    def propose(self, batch) -> None:
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
    spec = on.engine.spec_stats
    assert spec.num_accepted > 0
    # /metrics reports the engine's counters.
    text = ServerMetrics(on.engine.stats).render().decode()
    figures = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("pagellm:spec")}
    assert figures == {"pagellm:spec_decode_num_draft_tokens_total": spec.num_proposed,
                       "pagellm:spec_decode_num_accepted_tokens_total": spec.num_accepted,
                       "pagellm:spec_decode_acceptance_rate": pytest.approx(spec.num_accepted / spec.num_proposed),
                       "pagellm:spec_decode_mean_tokens_per_step": pytest.approx(
                           (spec.num_accepted + spec.num_steps) / spec.num_steps)}


def test_lookahead_lowered_with_the_batch(tiny_llama):
    """k while B (k + 1) verified tokens fit in 4 x speculative_max_batch, fewer above, none past it."""
    assert [lookahead_for_batch(4, 32, b) for b in (1, 25, 26, 32, 33)] == [4, 4, 3, 3, 0]
    assert [lookahead_for_batch(8, 32, b) for b in (14, 15, 16, 24, 32)] == [8, 7, 7, 4, 3]
    kw = dict(dtype="float32", block_size=4, num_kv_blocks=128)
    off = LLM(str(tiny_llama), **kw)
    prompts = repetitive_prompts(off.engine.model_config.vocab_size)[:3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 20, 30)]
    expected = off.generate(prompts, params)
    on = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=4, speculative_max_batch=2, **kw)
    oracle, seen = with_oracle(on, prompts, expected), {}
    propose = oracle.propose

    def recording(batch):
        running = len(on.engine.scheduler.running)
        seen[running] = max(seen.get(running, 0), *batch.lookahead.values())
        propose(batch)
    oracle.propose = recording
    assert token_ids(on.generate(prompts, params)) == token_ids(expected)
    assert seen == {2: 3, 1: 4}   # 8 verified tokens: k = 3 for two sequences; three: no speculation


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


def perturbed_copy(folder, dst, scale: float, seed: int = 0):
    """The model of ``folder`` with every weight moved by N(0, scale^2) noise: a
    draft that agrees with its target often, not always."""
    shutil.copytree(folder, dst)
    path = dst / "model.safetensors"
    g = torch.Generator().manual_seed(seed)
    weights = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def draft_pair(tiny_llama, tmp_path_factory):
    """(target, draft): the tiny Llama and a perturbed copy of it."""
    return tiny_llama, perturbed_copy(tiny_llama, tmp_path_factory.mktemp("draft") / "draft", 0.05)


def test_draft_model_greedy_identical_under_preemption(draft_pair):
    target, draft = draft_pair
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    pool = dict(SMALL_POOL, num_kv_blocks=20)
    off = LLM(str(target), **pool)
    prompts = repetitive_prompts(off.engine.model_config.vocab_size)
    expected = token_ids(off.generate(prompts, params))
    on = LLM(str(target), speculative_model=str(draft), num_speculative_tokens=3, **pool)
    assert token_ids(on.generate(prompts, params)) == expected
    engine, proposer = on.engine, on.engine.proposer
    assert engine.scheduler.stats.num_preemptions > 0
    assert 0 < engine.spec_stats.num_accepted < engine.spec_stats.num_proposed
    assert engine.block_manager.num_free_blocks == pool["num_kv_blocks"]
    assert not proposer.shadows and proposer.block_manager.num_free_blocks == pool["num_kv_blocks"]
    # The draft is its target: every proposal is accepted, k + 1 tokens a step.
    same = LLM(str(target), speculative_model=str(target), num_speculative_tokens=3, **pool)
    assert token_ids(same.generate(prompts[:2], params)) == expected[:2]
    assert same.engine.spec_stats.acceptance_rate == 1.0
    # The draft in its own format (int8 codes of the target, which stays dense): still the target's tokens.
    cheap = LLM(str(target), speculative_model=str(target), speculative_quantization="int8",
                num_speculative_tokens=3, **pool)
    assert token_ids(cheap.generate(prompts[:2], params)) == expected[:2]
    methods = {type(module.method).__name__ for module in cheap.engine.proposer.runner.model.modules()
               if isinstance(module, Linear)}
    assert methods == {"Int8LinearMethod", "DenseLinearMethod"}     # the embedding dense (an untied LM head is int8)
    assert isinstance(cheap.engine.runner.model.layers[0].mlp.down_proj.method, DenseLinearMethod)
    assert cheap.engine.spec_stats.acceptance_rate > 0.5


def test_draft_weights_and_pool_are_in_the_memory_plan(draft_pair):
    """The budget pays for both pools (as many blocks each) and the draft's weights: closed forms."""
    target, draft = draft_pair
    alone = LLM(str(target), kv_cache_memory="1MiB").engine.runner
    kv = LLM(str(target), speculative_model=str(draft), kv_cache_memory="1MiB").engine
    per_block = alone.kv_spec.bytes_per_block + kv.proposer.runner.kv_spec.bytes_per_block
    assert kv.runner.kv_cache.num_blocks == kv.proposer.block_manager.num_blocks == 2**20 // per_block
    total = 2 * (alone.weights_bytes + kv.proposer.runner.weights_bytes) + alone.memory.activation_bytes + 300 * per_block
    budget = LLM(str(target), speculative_model=str(draft), gpu_memory=total).engine
    draft_weights = budget.proposer.runner.weights_bytes
    left = total - budget.runner.weights_bytes - draft_weights - budget.memory.activation_bytes
    assert budget.runner.kv_cache.num_blocks == left // per_block
    assert budget.memory.draft_bytes == draft_weights + budget.runner.kv_cache.num_blocks * (per_block -
                                                                                          alone.kv_spec.bytes_per_block)
    assert "draft model" in budget.memory.summary()


def test_draft_format_needs_a_draft_and_a_known_format():
    with pytest.raises(ValueError, match="needs speculative_model"):
        EngineConfig(model="m", speculative_quantization="int8")
    with pytest.raises(ValueError, match="int3"):
        EngineConfig(model="m", speculative_model="d", speculative_quantization="int3")


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-squared quantile at normal quantile ``z`` (3.09: p = 0.001), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting fewer than 5 draws are pooled."""
    big = [c for c, p in expected.items() if p * n >= 5]
    cells = [(counts.get(c, 0), expected[c] * n) for c in big]
    cells.append((n - sum(o for o, _ in cells), n - sum(e for _, e in cells)))
    return sum((o - e) ** 2 / e for o, e in cells if e > 0), len(cells) - 1


def test_draft_sampling_preserves_the_target_distribution(draft_pair):
    """Rejection sampling against a draft that often disagrees: the law of the
    tokens after the first (each drawn by verification) is the target's, as
    computed by HF transformers on the same weights (top-k 4, temperature 1)."""
    target, draft = draft_pair
    prompt, top_k, n = [5, 17, 42, 7], 4, 600
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    def law(contexts: list[list[int]]) -> list[dict[int, float]]:
        with torch.no_grad():
            logits = hf(torch.tensor(contexts)).logits[:, -1]
        values, ids = logits.topk(top_k, dim=-1)
        return [dict(zip(i.tolist(), torch.softmax(v, -1).tolist())) for v, i in zip(values, ids)]

    first = law([prompt])[0]
    second = dict(zip(first, law([prompt + [t] for t in first])))
    pairs = {(a, b): pa * pb for a, pa in first.items() for b, pb in second[a].items()}
    pair_list = list(pairs)
    third_given = dict(zip(pair_list, law([prompt + list(ab) for ab in pair_list])))
    third: dict[int, float] = {}
    for ab, p in pairs.items():
        for c, pc in third_given[ab].items():
            third[c] = third.get(c, 0.0) + p * pc

    kw = dict(dtype="float32", block_size=4, num_kv_blocks=2048, max_num_seqs=256)
    params = [SamplingParams(temperature=1.0, top_k=top_k, seed=i, max_tokens=4, ignore_eos=True) for i in range(n)]
    on = LLM(str(target), speculative_model=str(draft), num_speculative_tokens=2, speculative_max_batch=256, **kw)
    for llm in (on, LLM(str(target), **kw)):
        outs = [o.outputs[0].token_ids for o in llm.generate([prompt] * n, params, use_tqdm=False)]
        pair_counts, third_counts = {}, {}
        for t in outs:
            pair_counts[t[0], t[1]] = pair_counts.get((t[0], t[1]), 0) + 1
            third_counts[t[2]] = third_counts.get(t[2], 0) + 1
        for counts, expected in ((pair_counts, pairs), (third_counts, third)):
            stat, df = chi2(counts, expected, n)
            assert stat < chi2_critical(df), (stat, df)
    spec = on.engine.spec_stats
    assert spec.num_proposed >= n and 0.05 < spec.acceptance_rate < 0.9   # accepted and rejected proposals


@pytest.mark.slow
def test_real_draft_pair_greedy_identical(qwen_gguf, qwen15_gguf):
    """Qwen2.5-Coder-0.5B drafting for the 1.5B (GGUF blocks): the same tokens as the 1.5B alone."""
    llm = LLM(str(qwen15_gguf), kv_cache_memory="64MiB", max_model_len=256, speculative_model=str(qwen_gguf))
    prompt = llm.get_tokenizer().encode('def is_prime(n: int) -> bool:\n    """Return True when n is prime."""\n')
    params = SamplingParams(temperature=0, max_tokens=16)
    with_speculation = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.scheduler.config.num_lookahead = 0   # the same engine without speculation
    assert with_speculation == llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.spec_stats.acceptance_rate > 0.5
