"""The int8 KV cache on the real Qwen2.5-Coder-0.5B GGUF (its own Q4_K/Q8_0
blocks, fp32 activations): ``prompt_logprobs`` perplexity over 256 tokens of
the fixed text against the float cache. Every key a token attends to is read
back quantized (the prompt's own K/V are written to the cache before attention
reads them). Qwen2.5's keys carry a few huge channels (its k_proj bias);
without key smoothing int8 costs +2.6% here, with it the issue's +0.5% bound
holds (``benchmarks/kv_quant_quality.py`` measures 1,024 tokens, fp8 and greedy
continuations).

One engine, to halve the CPU time: the float reference is the same model
(key smoothing folded in, which leaves every q.k unchanged: test_kv_quant checks
it) with its pool swapped for a float one of the same blocks."""
from __future__ import annotations

from pathlib import Path

import torch

from pagellm import LLM
from pagellm.bench.perplexity import perplexity
from pagellm.engine.kv_cache import KVCache, KVCacheSpec

TEXT = Path(__file__).parent / "data" / "textwrap.py.txt"
TOKENS = 256
BOUND = 0.005


def test_int8_kv_cache_perplexity_within_half_a_percent_of_the_float_cache(qwen_gguf):
    llm = LLM(str(qwen_gguf), dtype="float32", kv_cache_dtype="int8", num_kv_blocks=TOKENS // 16 + 4,
              max_model_len=TOKENS + 1, enable_prefix_caching=False)   # no block outlives the pool swap
    ids = llm.get_tokenizer().encode(TEXT.read_text(), add_special_tokens=False)[:TOKENS]
    quantized = perplexity(llm, ids, TOKENS).perplexity
    runner = llm.engine.runner
    assert runner.kv_cache.pool.dtype == torch.int8
    runner.kv_cache = KVCache(KVCacheSpec.for_model(llm.engine.model_config, torch.float32, 16),
                              runner.kv_cache.num_blocks, "cpu")
    base = perplexity(llm, ids, TOKENS).perplexity
    assert 1.0 < base < 50.0
    change = quantized / base - 1
    # quantization noise may also lower it a little (-0.6% measured on these 256 tokens)
    assert -0.02 <= change <= BOUND, f"int8 KV: perplexity {change:+.2%} against the float cache"
