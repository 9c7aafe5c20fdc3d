"""The real Qwen2.5-Coder-0.5B GGUF: pagellm's greedy output equals HF
transformers loading the same file."""
from __future__ import annotations

import torch

from pagellm import LLM, SamplingParams

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 24


def test_qwen_gguf_greedy_matches_hf(qwen_gguf, qwen_hf):
    """With the asynchronous step pipeline (the default) and without it."""
    llm = LLM(str(qwen_gguf), dtype="float32", kv_cache_memory="256MiB", max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = llm.generate([PROMPT], params)[0]
    llm.engine.overlap = False
    synchronous = llm.generate([PROMPT], params)[0]
    ids = torch.tensor([out.prompt_token_ids])
    with torch.no_grad():
        expected = qwen_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                    min_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.outputs[0].token_ids == expected == synchronous.outputs[0].token_ids
    assert out.outputs[0].text.strip().startswith(("if", "\"\"\"", "#", "a", "return"))
