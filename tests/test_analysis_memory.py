"""Memory calculator, fit solver and advisor against closed-form numbers worked out by hand."""
import math

import pytest

from pagellm.analysis.memory import MemoryOptions, advise, fit, max_batch, memory_breakdown
from pagellm.model.config import ModelConfig
from pagellm.sizing import (CUDA_SORT_COPIES, SAMPLER_COPIES, Precision, activation_bytes, kv_bytes_per_token,
                            kv_tokens_per_sequence, shard, weights_bytes)
from pagellm.model.presets import load_preset

KiB, MiB, GiB = 2**10, 2**20, 2**30
LLAMA2_7B_PARAMS = 6_738_415_616


@pytest.fixture(scope="module")
def llama7():
    return load_preset("llama-2-7b")


def mqa_config(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=1, head_dim=128)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------- KV cache

def test_llama2_7b_kv_cache(llama7):
    per_token = 2 * 32 * 32 * 128 * 2               # K and V, layers, heads, head dim, fp16
    assert per_token == 512 * KiB
    assert kv_bytes_per_token(llama7) == per_token
    assert memory_breakdown(llama7, 1, 2048).kv_bytes == 1 * GiB
    kv_1024 = memory_breakdown(llama7, 1, 1024).kv_bytes
    assert kv_1024 == 536_870_912 and round(kv_1024 / 1e6) == 537     # "537 MB for 1024 tokens"
    assert memory_breakdown(llama7, 8, 1024).kv_bytes == 8 * 1024 * per_token


def test_gqa_llama3_8b_kv_per_token():
    assert kv_bytes_per_token(load_preset("llama-3-8b")) == 2 * 32 * 8 * 128 * 2 == 128 * KiB


def test_mqa_kv_per_token_and_tp_replication():
    config = mqa_config()
    assert kv_bytes_per_token(config) == 2 * 32 * 1 * 128 * 2
    # One KV head cannot be split: with TP=4 every GPU keeps a replica.
    assert shard(config, 4).kv_replicated
    assert kv_bytes_per_token(config, tp=4) == 2 * 32 * 1 * 128 * 2


def test_kv_quantized_widths():
    llama3 = load_preset("llama-3-8b")
    assert kv_bytes_per_token(llama3, Precision(kv_bits=8)) == 2 * 32 * 8 * (128 + 2)   # + fp16 scale
    # 4-bit: half a byte per element plus one fp16 scale per head vector.
    assert kv_bytes_per_token(llama3, Precision(kv_bits=4)) == 2 * 32 * 8 * (128 // 2 + 2)


def test_sliding_window_caps_kv():
    mistral = load_preset("mistral-7b")
    per_token = 2 * 32 * 8 * 128 * 2
    assert memory_breakdown(mistral, 1, 8192).kv_bytes == 4096 * per_token
    assert memory_breakdown(mistral, 2, 32768).kv_bytes == 2 * 4096 * per_token
    assert memory_breakdown(mistral, 1, 3000).kv_bytes == 3008 * per_token     # 188 pages of 16
    assert kv_tokens_per_sequence(mistral, 1000, block_size=1) == 1000


# ---------------------------------------------------------------- weights

def test_llama2_7b_fp16_weights(llama7):
    assert weights_bytes(llama7) == 2 * LLAMA2_7B_PARAMS == 13_476_831_232
    assert round(weights_bytes(llama7) / 1e9, 1) == 13.5


def test_int4_weights_include_scales(llama7):
    h, i, v = 4096, 11008, 32000

    def w4(in_f, out_f):  # 4-bit data + one fp16 scale per 128 inputs per output
        return in_f * out_f // 2 + out_f * math.ceil(in_f / 128) * 2

    assert Precision(w_bits=4).linear_weight_bytes(h, h) == 8 * MiB + 256 * KiB
    block = 4 * w4(h, h) + 2 * w4(h, i) + w4(i, h) + 2 * h * 2
    outside = (v * h + h) * 2                          # embeddings and final norm stay fp16
    head = v * h + v * 2                               # the untied LM head: int8, one fp16 scale per row
    assert weights_bytes(llama7, Precision(w_bits=4)) == 32 * block + outside + head
    w8a8, w8 = Precision(w_bits=8, a_bits=8), Precision(w_bits=8)     # W8A8 keeps the head at 16 bits
    assert weights_bytes(llama7, w8a8) - weights_bytes(llama7, w8) == v * h * 2 - head
    # Per output channel: one scale per row.
    assert Precision(w_bits=8, group_size=-1).linear_weight_bytes(h, i) == h * i + i * 2


def test_tp2_halves_weights_and_kv_heads(llama7):
    norms = 2 * 32 * 4096 + 4096                         # replicated on every GPU
    expected = ((LLAMA2_7B_PARAMS - norms) // 2 + norms) * 2
    assert weights_bytes(llama7, tp=2) == expected
    assert kv_bytes_per_token(llama7, tp=2) == 2 * 32 * 16 * 128 * 2
    assert shard(llama7, 2).q_heads == 16 and shard(llama7, 2).kv_heads == 16


def test_tp_must_divide_heads(llama7):
    with pytest.raises(ValueError, match="does not divide the 32 attention heads"):
        weights_bytes(llama7, tp=3)


def test_tied_embeddings_counted_once():
    qwen = load_preset("qwen2.5-0.5b")
    assert weights_bytes(qwen) == 2 * 494_032_768


# ---------------------------------------------------------------- activations and total

def test_activation_peak_closed_form(llama7):
    t, h, i = 2048, 4096, 11008
    stream = 4 * t * h * 2                                # block input + residual, normed x + new residual
    attn = t * (2 * h + 2 * h + h) * 2                    # Q, K, V, attention out, O projection
    mlp = 3 * t * i * 2                                   # gate, up, product
    assert activation_bytes(llama7, Precision(), t, 1, 2048) == stream + max(attn, mlp)
    # Unfused attention adds the score matrix: heads x T x keys.
    unfused = activation_bytes(llama7, Precision(), t, 1, 2048, flash_attention=False)
    assert unfused == stream + max(attn + 32 * t * 2048 * 2, mlp)
    # Sampling many rows outweighs a short forward: hidden states, sampled rows, fp32 logits, and the
    # sampler's working copies of the logits of the rows it takes at once (2^23 // 32000 = 262).
    sampled = activation_bytes(llama7, Precision(), 64, 64, 2048)
    assert sampled == 64 * h * 2 + 64 * (h * 2 + 32000 * 4) + (SAMPLER_COPIES + CUDA_SORT_COPIES) * 64 * 32000 * 4
    many = activation_bytes(llama7, Precision(), 64, 1000, 2048)
    assert many == 64 * h * 2 + 1000 * (h * 2 + 32000 * 4) + (SAMPLER_COPIES + CUDA_SORT_COPIES) * 262 * 32000 * 4


def test_breakdown_total_is_sum(llama7):
    b = memory_breakdown(llama7, 4, 1024, workspace_bytes=GiB)
    assert b.total_bytes == b.weights_bytes + b.kv_bytes + b.activation_bytes + GiB
    j = b.to_json()
    assert {"weights_bytes", "kv_bytes", "kv_bytes_per_token", "activation_bytes", "total_bytes"} <= set(j)


# ---------------------------------------------------------------- fit and advice

def test_fit_closed_form(llama7):
    mem = 80 * GiB
    weights = 2 * LLAMA2_7B_PARAMS
    act = 4 * 2048 * 4096 * 2 + 3 * 2048 * 11008 * 2               # full prefill chunk, MLP phase peak
    sampling_66 = 2048 * 4096 * 2 + 66 * (4096 * 2 + 32000 * 4 * (1 + SAMPLER_COPIES + CUDA_SORT_COPIES))
    assert sampling_66 < act                                         # the forward is the peak at these batches
    per_seq = 2048 * 512 * KiB                                       # KV of one sequence
    report = fit(llama7, mem, 1, 2048)
    assert report.fits
    assert report.max_batch == (mem - weights - GiB - act) // per_seq == 66
    pages = (mem - weights - GiB - act) // (16 * 512 * KiB)
    assert report.max_context_by_memory == pages * 16
    assert report.max_context == 4096 and report.max_context_limited_by == "model"


def test_fit_when_weights_do_not_fit():
    report = fit(load_preset("llama-2-70b"), 80 * GiB, 1, 4096)
    assert not report.fits and report.max_batch == 0 and report.max_context == 0


def test_fit_sliding_window_is_unbounded_by_memory():
    report = fit(load_preset("mistral-7b"), 24 * GiB, 4, 32768)
    assert report.max_context_by_memory is None
    assert report.max_context == 32768


def test_advise_picks_cheapest_reaching_target():
    config = load_preset("llama-3-70b")
    opts = MemoryOptions(tp=2)
    advice = advise(config, 80 * GiB, 16, 32768, Precision(), opts)
    best = advice.recommended
    assert (best.w_bits, best.kv_bits, best.max_len) == (8, 8, 32768)
    assert best.concurrency >= 16
    assert best.concurrency == max_batch(config, 80 * GiB, 32768, Precision(w_bits=8, kv_bits=8), opts)
    cheaper = [o for o in advice.options if o.penalty < best.penalty]
    assert cheaper and all(o.concurrency < 16 for o in cheaper)


def test_advise_reports_impossible_target():
    advice = advise(load_preset("llama-3-70b"), 24 * GiB, 100, 8192)
    assert advice.recommended is None
    assert all(o.concurrency < 100 for o in advice.options)
