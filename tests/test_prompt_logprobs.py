"""Prompt log-probabilities against HF transformers' log-softmax of the same
prompt, under chunked prefill, preemption and a prefix already in the cache."""
from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams
from test_engine_parity import hf_model, prompts


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log p(prompt[i] | prompt[:i]) for i = 1 .. len - 1, and the full rows."""
    with torch.no_grad():
        rows = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)[:-1]
    return rows.gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1), rows


def test_prompt_logprobs_match_hf_under_chunking_and_preemption(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, num_kv_blocks=10, max_num_batched_tokens=8)
    reference = hf_model(tiny_llama)
    batch = prompts(reference.config.vocab_size)
    batch.append(list(batch[2]))           # the same prompt again: its prefix is cached, yet scored in full
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=2),
                           use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0 and llm.engine.scheduler.stats.num_chunked_prefills > 0
    for prompt, out in zip(batch, outputs):
        expected, rows = hf_prompt_logprobs(reference, prompt)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        got = torch.tensor([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        for entry, token, row in zip(out.prompt_logprobs[1:], prompt[1:], rows):
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            top = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank is not None and lp.rank <= 2)
            assert [t for _, t in top] == row.topk(2).indices.tolist()


def test_prompt_logprobs_are_not_asked_for_by_default(tiny_llama):
    out = LLM(str(tiny_llama), dtype="float32", num_kv_blocks=16).generate([[5, 6, 7]], SamplingParams(max_tokens=1),
                                                                            use_tqdm=False)[0]
    assert out.prompt_logprobs is None


def test_bad_prompt_logprobs_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)
