"""Prefix caching, copy-on-write forks for n > 1, and beam search."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.engine.beam_search import BeamSearchParams
from pagellm.utils.math import cdiv
from tiny_models import make_tiny_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Long enough positions for the shared-prefix workloads below.
    return make_tiny_hf_model(tmp_path_factory.mktemp("long"), arch="qwen2", num_kv_heads=2,
                              max_position_embeddings=2048)


def run_with_peak_blocks(llm: LLM, prompts, params):
    engine, peak, outputs = llm.engine, 0, {}
    ids = llm._submit(prompts, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        peak = max(peak, engine.block_manager.num_used_blocks)
    return [outputs[i] for i in ids], peak


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_cache_on_equals_cache_off_under_sharing_and_eviction(model_dir):
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 300, (37,), generator=g).tolist()
    prompts = [system + torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (12,))]
    prompts += prompts[:4]                                     # exact repeats
    kwargs = dict(dtype="float32", block_size=4, num_kv_blocks=40, max_num_batched_tokens=32)
    on = LLM(str(model_dir), **kwargs)
    off = LLM(str(model_dir), enable_prefix_caching=False, **kwargs)
    out_on = [o.outputs[0].token_ids for o in on.generate(prompts, greedy(10))]
    out_off = [o.outputs[0].token_ids for o in off.generate(prompts, greedy(10))]
    assert out_on == out_off
    assert on.engine.block_manager.stats.hit_rate > 0.3
    assert on.engine.scheduler.stats.num_preemptions > 0      # the pool is small enough to evict
    assert on.engine.scheduler.stats.num_prefill_tokens < off.engine.scheduler.stats.num_prefill_tokens


def test_shared_system_prompt_is_computed_once(model_dir):
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, 300, (1000,), generator=g).tolist()
    prompts = [system + torch.randint(3, 300, (8,), generator=g).tolist() for _ in range(64)]
    llm = LLM(str(model_dir), dtype="float32", block_size=16, num_kv_blocks=1200, max_num_batched_tokens=2048)
    llm.generate(prompts, greedy(2))
    prefill = llm.engine.scheduler.stats.num_prefill_tokens
    # 1000 shared tokens once, then per request its 8 own tokens plus the tail of
    # the shared prefix that does not fill a whole 16-token block (1000 = 62*16 + 8).
    assert prefill <= 1000 + 64 * (8 + 8)
    off = LLM(str(model_dir), dtype="float32", block_size=16, num_kv_blocks=1200, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    off.generate(prompts[:4], greedy(2))
    assert off.engine.scheduler.stats.num_prefill_tokens >= 4 * 1008


def test_parallel_samples_share_prompt_blocks(model_dir):
    prompt = torch.randint(3, 300, (512,), generator=torch.Generator().manual_seed(2)).tolist()
    n, max_tokens, block = 8, 24, 16
    llm = LLM(str(model_dir), dtype="float32", block_size=block, num_kv_blocks=400, enable_prefix_caching=False)
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=5, ignore_eos=True)
    (shared,), peak_shared = run_with_peak_blocks(llm, [prompt], params)
    prompt_blocks, generated_blocks = 512 // block, cdiv(max_tokens, block)
    assert peak_shared <= prompt_blocks + n * (generated_blocks + 1)
    assert len({tuple(o.token_ids) for o in shared.outputs}) == n

    independent = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=s, ignore_eos=True) for s in range(n)]
    _, peak_alone = run_with_peak_blocks(llm, [prompt] * n, independent)
    assert peak_alone >= n * prompt_blocks


def test_forked_samples_see_the_right_cache(model_dir):
    """Every sample of an n > 1 request has the log-probs HF computes for its own tokens."""
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=200)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = list(range(10, 23))                               # 13 tokens: the last block is partly filled
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=9, logprobs=0,
                                                ignore_eos=True))[0]
    greedy_outs = llm.generate([prompt], greedy(8, n=3))[0].outputs
    assert len({tuple(o.token_ids) for o in greedy_outs}) == 1
    for sample in out.outputs:
        ids = prompt + sample.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
        for i, (token, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            assert abs(entry[token].logprob - ref[len(prompt) - 1 + i, token].item()) < 1e-4


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_hf(model_dir, length_penalty):
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=300)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    for prompt in ([5, 6, 7, 8, 9], list(range(40, 51))):
        (ours,) = llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=12,
                                                             length_penalty=length_penalty))
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              num_beams=4, num_return_sequences=4, max_new_tokens=12, do_sample=False,
                              length_penalty=length_penalty, early_stopping=False)[:, len(prompt):].tolist()
        trimmed = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
        assert [s.tokens for s in ours.sequences] == trimmed
