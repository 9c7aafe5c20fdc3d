"""Per-layer roofline counts against closed forms worked out by hand."""
import pytest

from pagellm.analysis.hardware import get_hardware
from pagellm.sizing import Precision
from pagellm.analysis.roofline import analyze, analyze_step, end_to_end
from pagellm.model.config import ModelConfig
from pagellm.model.presets import load_preset

MiB, KiB = 2**20, 2**10
H100 = get_hardware("H100-SXM")
BW, FP16, INT8, LINK = 3.35e12, 989.4e12, 1978.9e12, 450e9


@pytest.fixture(scope="module")
def llama7():
    return load_preset("llama-2-7b")


def rows(stage):
    return {r.name: r for r in stage.layers + stage.outside}


def test_llama2_7b_prefill_q_proj(llama7):
    report = analyze(llama7, H100, batch_size=1, prompt_len=2048, gen_len=1)
    q = rows(report.prefill)["q_proj"]
    assert q.ops == 2 * 4096 * 4096 * 2048
    assert q.cost.weight_bytes == 32 * MiB
    assert q.cost.act_bytes == 2048 * 4096 * 2 + 2048 * 4096 * 2
    assert q.cost.kv_bytes == 0
    assert q.intensity == pytest.approx(2 * 4096 * 4096 * 2048 / (32 * MiB + 2 * 2048 * 4096 * 2))
    assert q.bound == "compute"
    assert q.time_s == pytest.approx(2 * 4096 * 4096 * 2048 / FP16)


def test_llama2_7b_decode_q_proj(llama7):
    q = rows(analyze_step(llama7, H100, 1, 1, 2048))["q_proj"]
    assert q.ops == 2 * 4096 * 4096
    assert q.bytes == 32 * MiB + 2 * 4096 * 2
    assert q.bound == "memory"
    assert q.time_s == pytest.approx((32 * MiB + 2 * 4096 * 2) / BW)


def test_unfused_attention_counts_full_square(llama7):
    s = 2048
    r = rows(analyze_step(llama7, H100, 1, s, 0, flash_attention=False))
    assert r["qk_matmul"].ops == 2 * 32 * s * s * 128
    assert r["sv_matmul"].ops == 2 * 32 * s * s * 128
    assert r["softmax"].ops == 5 * 32 * s * s
    assert r["qk_matmul"].cost.act_write_bytes == 32 * s * s * 2          # the score matrix
    assert r["qk_matmul"].cost.kv_read_bytes == s * 32 * 128 * 2           # K once
    assert "flash_attention" not in r


def test_flash_attention_counts_causal_pairs(llama7):
    s = 2048
    r = rows(analyze_step(llama7, H100, 1, s, 0, flash_attention=True))
    fa = r["flash_attention"]
    assert fa.ops == 32 * (s * (s + 1) // 2) * (4 * 128 + 5)
    assert fa.cost.kv_read_bytes == 2 * s * 32 * 128 * 2                   # K and V read once
    assert fa.cost.act_bytes == 2 * s * 4096 * 2                           # Q in, O out
    assert "qk_matmul" not in r and "softmax" not in r


def test_decode_attention_reads_whole_cache(llama7):
    L = 2048
    fa = rows(analyze_step(llama7, H100, 1, 1, L, flash_attention=True))["flash_attention"]
    assert fa.ops == 32 * (L + 1) * (4 * 128 + 5)                         # the new token sees L + 1 keys
    assert fa.cost.kv_read_bytes == 2 * (L + 1) * 32 * 128 * 2
    assert fa.bound == "memory"


def test_gqa_kv_traffic_per_kv_head():
    config = load_preset("llama-3-8b")
    fa = rows(analyze_step(config, H100, 4, 1, 1000, flash_attention=True))["flash_attention"]
    assert fa.cost.kv_read_bytes == 2 * 4 * 1001 * 8 * 128 * 2            # 8 KV heads, not 32
    assert fa.ops == 4 * 32 * 1001 * (4 * 128 + 5)                         # but all 32 query heads compute
    k = rows(analyze_step(config, H100, 4, 1, 1000))["k_proj"]
    assert k.cost.weight_bytes == 4096 * 8 * 128 * 2


def test_mqa_kv_store_and_read():
    config = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=1, head_dim=128)
    r = rows(analyze_step(config, H100, 2, 1, 500, flash_attention=True))
    assert r["flash_attention"].cost.kv_read_bytes == 2 * 2 * 501 * 1 * 128 * 2
    assert r["kv_cache_store"].cost.kv_write_bytes == 2 * 2 * 1 * 128 * 2


def test_sliding_window_caps_keys():
    mistral = load_preset("mistral-7b")
    r = rows(analyze_step(mistral, H100, 2, 1, 10_000, flash_attention=True))
    assert r["flash_attention"].cost.kv_read_bytes == 2 * 2 * 4096 * 8 * 128 * 2
    r = rows(analyze_step(mistral, H100, 2, 1, 10_000, flash_attention=False))
    assert r["qk_matmul"].ops == 2 * 2 * 32 * 4096 * 128
    s = 8192
    fa = rows(analyze_step(mistral, H100, 1, s, 0, flash_attention=True))["flash_attention"]
    pairs = 4096 * 4097 // 2 + (s - 4096) * 4096                          # ramp up, then full windows
    assert fa.ops == 32 * pairs * (4 * 128 + 5)


def test_prefill_totals_closed_form(llama7):
    s, h, i, v, heads, hd = 512, 4096, 11008, 32000, 32, 128
    t = s
    block = (4 * t * h                       # attn_norm
             + 3 * 2 * t * h * h             # q, k, v
             + 3 * t * 2 * h                 # rope on q and k
             + 2 * heads * s * s * hd        # QK^T (full square, unfused)
             + 5 * heads * s * s             # softmax
             + 2 * heads * s * s * hd        # PV
             + 2 * t * h * h                 # o_proj
             + t * h                         # residual add
             + 4 * t * h                     # mlp_norm
             + 2 * 2 * t * h * i             # gate, up
             + 5 * t * i                     # SiLU(gate) * up
             + 2 * t * i * h                 # down
             + t * h)                        # residual add
    outside = 4 * t * h + 2 * 1 * h * v      # final norm on all tokens; LM head on the last one
    report = analyze(llama7, H100, batch_size=1, prompt_len=s, gen_len=1)
    assert report.prefill.ops == 32 * block + outside
    total = report.to_json()["prefill"]["total"]
    assert total["ops"] == 32 * block + outside
    per_block_time = sum(r.time_s for r in report.prefill.layers)
    assert total["time_s"] == pytest.approx(32 * per_block_time + sum(r.time_s for r in report.prefill.outside))
    lm = rows(report.prefill)["lm_head"]
    assert lm.ops == 2 * h * v and lm.cost.weight_bytes == v * h * 2


def test_decode_time_is_weight_streaming_bound(llama7):
    # A 7B fp16 decode step at batch 1 must take about weights / bandwidth.
    report = analyze(llama7, H100, batch_size=1, prompt_len=128, gen_len=2)
    assert report.decode.time_s == pytest.approx(2 * 6_738_415_616 / BW, rel=0.02)


def test_tp2_halves_per_gpu_work(llama7):
    r1 = rows(analyze_step(llama7, H100, 1, 1, 1024, tp=1))
    r2 = rows(analyze_step(llama7, H100, 1, 1, 1024, tp=2))
    assert r2["q_proj"].cost.weight_bytes == r1["q_proj"].cost.weight_bytes / 2 == 16 * MiB
    assert r2["k_proj"].cost.weight_bytes == 4096 * 16 * 128 * 2
    assert r2["kv_cache_store"].cost.kv_write_bytes == 2 * 16 * 128 * 2
    assert r2["lm_head"].cost.weight_bytes == 16000 * 4096 * 2
    ar = r2["attn_all_reduce"]
    assert ar.bound == "comm" and ar.cost.comm_bytes == 4096 * 2
    assert ar.time_s == pytest.approx(2 * (2 - 1) / 2 * 4096 * 2 / LINK)
    assert "attn_all_reduce" not in r1


def test_int4_weights_and_int8_compute(llama7):
    r = rows(analyze_step(llama7, H100, 1, 1, 100, Precision(w_bits=4)))
    assert r["q_proj"].cost.weight_bytes == 8 * MiB + 256 * KiB           # 4-bit data + fp16 scales
    assert r["lm_head"].cost.weight_bytes == 32000 * 4096 * 2              # LM head stays 16-bit
    p = rows(analyze_step(llama7, H100, 1, 2048, 0, Precision(w_bits=8, a_bits=8)))["q_proj"]
    assert p.cost.act_read_bytes == 2048 * 4096                            # 1-byte activations
    assert p.time_s == pytest.approx(2 * 4096 * 4096 * 2048 / INT8)


def test_int4_kv_bytes(llama7):
    r = rows(analyze_step(llama7, H100, 1, 1, 99, Precision(kv_bits=4), flash_attention=True))
    assert r["flash_attention"].cost.kv_read_bytes == 2 * 100 * 32 * (64 + 2)


def test_end_to_end(llama7):
    one = analyze(llama7, H100, batch_size=2, prompt_len=256, gen_len=1)
    assert one.e2e.total_time_s == one.e2e.ttft_s == one.prefill.time_s
    three = analyze(llama7, H100, batch_size=2, prompt_len=256, gen_len=3)
    steps = [analyze_step(llama7, H100, 2, 1, c).time_s for c in (256, 257)]
    assert three.e2e.tpot_s == pytest.approx(sum(steps) / 2)
    assert three.e2e.total_time_s == pytest.approx(three.e2e.ttft_s + sum(steps))
    assert three.e2e.tokens_per_s == pytest.approx(2 * 3 / three.e2e.total_time_s)
    assert three.e2e.decode_tokens_per_s == pytest.approx(2 / three.e2e.tpot_s)


def test_long_generation_integration_matches_exact_sum():
    config = load_preset("qwen2.5-0.5b")
    e2e = end_to_end(config, H100, 16, 100, 700, flash_attention=True)
    exact = sum(analyze_step(config, H100, 16, 1, 100 + j, flash_attention=True).time_s for j in range(699)) / 699
    assert e2e.tpot_s == pytest.approx(exact, rel=1e-3)


def test_json_shape(llama7):
    j = analyze(llama7, H100, batch_size=1, prompt_len=64, gen_len=4).to_json()
    assert {"model", "hardware", "prefill", "decode", "memory", "e2e"} <= set(j)
    for stage in ("prefill", "decode"):
        for row in j[stage]["layers"]:
            assert {"name", "ops", "bytes", "weight_bytes", "act_bytes", "kv_bytes", "intensity", "bound",
                    "time_s"} <= set(row)
        assert {"ops", "bytes", "time_s"} <= set(j[stage]["total"])
    assert {"weights_bytes", "kv_bytes", "kv_bytes_per_token", "activation_bytes", "total_bytes"} <= set(j["memory"])
    assert j["memory"]["kv_bytes_per_token"] == 512 * KiB
    assert j["hardware"]["source"] == "datasheet"
