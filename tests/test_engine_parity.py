"""Token-for-token parity with HF transformers on tiny random models, under a
KV pool small enough that chunked prefill and preemption both happen."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.engine.scheduler import ScheduledBatch
from pagellm.engine.sequence import Sequence
from pagellm.engine.step import build_step_input
from pagellm.model.context import ForwardContext
from tiny_models import make_tiny_hf_model

ARCHS = {
    "llama-mha": dict(arch="llama", num_kv_heads=4),
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
    "llama-mqa": dict(arch="llama", num_kv_heads=1),
    "mistral-window": dict(arch="mistral", num_kv_heads=2, sliding_window=8),
    "llama3-rope-tied": dict(arch="llama", num_kv_heads=2, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}
PROMPT_LENS = (5, 13, 22, 3, 17)
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp(request.param), **ARCHS[request.param])


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Naive greedy decoding: full recompute of the sequence every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def test_greedy_matches_hf_with_preemption_and_chunked_prefill(model_dir):
    # 5 requests need 5..9 blocks each (block size 4); 12 blocks force preemption,
    # a budget of 8 tokens per step forces chunked prefill of the longer prompts.
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=12, max_num_batched_tokens=8)
    reference = hf_model(model_dir)
    batch = prompts(reference.config.vocab_size)
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    stats = llm.engine.scheduler.stats
    assert stats.num_preemptions > 0
    assert stats.num_chunked_prefills > 0
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, MAX_TOKENS)
    assert llm.engine.block_manager.num_free_blocks == 12


def test_greedy_matches_hf_with_prompt_chunks_capped_beside_decodes(model_dir):
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=3,
              max_num_batched_tokens=16, max_prefill_tokens_with_decodes=3)
    reference = hf_model(model_dir)
    batch = prompts(reference.config.vocab_size)
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert llm.engine.scheduler.stats.num_chunked_prefills > 0
    for prompt, output in zip(batch, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, MAX_TOKENS)


def test_prefill_logits_match_hf(model_dir):
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=64)
    reference = hf_model(model_dir)
    prompt = prompts(reference.config.vocab_size)[2]
    engine = llm.engine
    seq = Sequence(0, "x", 0, prompt, SamplingParams(), 0, 0.0)
    engine.block_manager.allocate(seq, len(prompt))
    batch = ScheduledBatch()
    batch.add(seq, len(prompt))
    runner = engine.runner
    input_ids, positions, meta = runner.prepare(build_step_input(batch, engine.config.block_size, []))
    with torch.inference_mode():
        hidden = runner.model(input_ids, positions, ForwardContext(meta, runner.kv_cache.layers, runner.backend))
        logits = runner.model.compute_logits(hidden)
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
