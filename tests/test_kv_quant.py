"""Quantized KV cache (``kv_cache_dtype`` int8 / fp8) on the CPU torch path:
the format against closed-form bounds, the paged write/read against naive
attention over independently fake-quantized K/V, scales moving with blocks
(copy-on-write forks, prefix hits, beam search), key smoothing against the
unsmoothed model, and the pool's size against ``pagellm.sizing``. With triton
installed, the Triton kernels' logic against the torch reference under
Triton's interpreter (the PTX code conversions themselves need a GPU:
``benchmarks/kv_quant_gpu.py --sections check``)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM, SamplingParams
from pagellm.engine.beam_search import BeamSearchParams
from pagellm.engine.kv_cache import KVCache, KVCacheSpec
from pagellm.kernels.attention import AttentionMetadata
from pagellm.kernels.kv_quant import KV_FORMATS, check_kv_cache_dtype, dequantize, quantize
from pagellm.kernels.torch_attention import paged_attention, write_kv_cache
from pagellm.model.key_smoothing import KEY_SMOOTHING_ALPHA, smooth_keys, smoothing_factors
from pagellm.model.model_spec import load_model_config
from pagellm.sizing import Precision, kv_bytes_per_token
from tiny_models import make_tiny_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("kvq"), arch="qwen2", num_kv_heads=2,
                              max_position_embeddings=512)


@pytest.mark.parametrize("name", list(KV_FORMATS))
def test_round_trip_error_is_within_half_a_step(name):
    fmt = KV_FORMATS[name]
    x = torch.randn(64, 4, 32) * torch.logspace(-3, 3, 64)[:, None, None]
    x[0, 0] = 0.0                                               # an all-zero vector stays zero
    codes, scale = quantize(x, fmt)
    assert codes.dtype == fmt.storage and scale.dtype == torch.float16 and scale.shape == x.shape[:2]
    back = dequantize(codes, scale, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    if name == "int8":     # uniform steps of amax / 127 (plus the fp16 rounding of the scale)
        bound = amax / 127 * 0.5 * (1 + 2e-3) + 1e-6
    else:                  # e4m3: 3 mantissa bits, relative half-step 1/16; subnormal step 2^-9 of the scale
        bound = x.abs() / 16 * (1 + 2e-3) + amax / 448 * 2.0 ** -10 + 1e-6
    assert ((back - x).abs() <= bound).all()
    assert torch.equal(back[0, 0], torch.zeros(32))


def _fake_quant_int8(x: torch.Tensor) -> torch.Tensor:
    """Closed-form symmetric int8 per vector (the test's own reference, not the code under test)."""
    scale = (x.abs().amax(-1, keepdim=True) / 127).half().float()
    return (x / scale).round().clamp(-127, 127) * scale


def test_paged_write_and_attention_match_naive_attention_over_fake_quantized_kv():
    torch.manual_seed(0)
    num_kv_heads, heads, dim, block = 2, 4, 32, 4
    lens, new = [11, 5, 1], [3, 5, 1]                     # two prefill chunks over cached context, one decode
    num_blocks = 16
    spec = KVCacheSpec(1, num_kv_heads, dim, torch.int8, block, has_null_block=False)
    cache = KVCache(spec, num_blocks, "cpu").layers[0]
    cache.k.fill_(99)                                     # stale codes and NaN scales must never be read
    cache.k_scale.fill_(float("nan"))
    tables = torch.randperm(num_blocks)[:12].view(3, 4).int()
    k_all = [torch.randn(n, num_kv_heads, dim) * torch.tensor([1.0, 30.0])[None, :, None] for n in lens]
    v_all = [torch.randn(n, num_kv_heads, dim) for n in lens]
    slots = [torch.tensor([int(tables[b, p // block]) * block + p % block for p in range(n)]) for b, n in
             enumerate(lens)]
    write_kv_cache(torch.cat(k_all), torch.cat(v_all), cache.k, cache.v, torch.cat(slots), cache.k_scale,
                   cache.v_scale)
    q = torch.randn(sum(new), heads, dim)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(starts, torch.tensor(lens, dtype=torch.int32), tables, torch.zeros(0, dtype=torch.int64),
                             max(new), max(lens))
    got = paged_attention(q, cache.k, cache.v, meta, dim ** -0.5, None, cache.k_scale, cache.v_scale)
    for b, (n, m) in enumerate(zip(lens, new)):
        k = _fake_quant_int8(k_all[b]).repeat_interleave(2, dim=1).transpose(0, 1)
        v = _fake_quant_int8(v_all[b]).repeat_interleave(2, dim=1).transpose(0, 1)
        qb = q[starts[b]:starts[b + 1]].transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        ref = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=dim ** -0.5).transpose(0, 1)
        torch.testing.assert_close(got[starts[b]:starts[b + 1]], ref, atol=1e-5, rtol=1e-5)


def test_copy_blocks_moves_codes_and_scales():
    spec = KVCacheSpec(2, 2, 16, torch.int8, 4, has_null_block=False)
    kv = KVCache(spec, 6, "cpu")
    kv.pool.copy_(torch.randint(-127, 128, kv.pool.shape, dtype=torch.int8))
    kv.scales.copy_(torch.rand(kv.scales.shape))
    before_pool, before_scales = kv.pool.clone(), kv.scales.clone()
    kv.copy_blocks([(1, 4), (2, 5)])
    assert torch.equal(kv.pool[:, :, [4, 5]], before_pool[:, :, [1, 2]])
    assert torch.equal(kv.scales[:, :, [4, 5]], before_scales[:, :, [1, 2]])
    assert torch.equal(kv.scales[:, :, :4], before_scales[:, :, :4])
    assert kv.nbytes == 6 * spec.bytes_per_block


HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_reads_a_cache_s_scales_as_k_v_pairs():
    from pagellm.kernels.triton_attention import _scale_pairs
    kv = KVCache(KVCacheSpec(2, 3, 16, torch.int8, 4, has_null_block=False), 5, "cpu")
    kv.scales.copy_(torch.rand(kv.scales.shape) + 0.5)
    layer = kv.layers[1]
    fmt, pairs = _scale_pairs(layer.k, layer.k_scale, layer.v_scale)
    assert fmt is KV_FORMATS["int8"] and pairs.dtype == torch.int32 and pairs.shape == layer.k_scale.shape
    low, high = (pairs & 0xFFFF).to(torch.int16), (pairs >> 16).to(torch.int16)
    assert torch.equal(low.view(torch.float16), layer.k_scale) and torch.equal(high.view(torch.float16), layer.v_scale)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_decode_split_policy():
    """Splits: the largest power of two within programs_per_sm * SMs programs
    (B * Hkv * splits), keys per split >= MIN_KEYS_PER_SPLIT, and max_splits."""
    from pagellm.kernels.triton_attention import MIN_KEYS_PER_SPLIT, num_kv_splits
    assert MIN_KEYS_PER_SPLIT == 64
    assert num_kv_splits(1, 8, 32768, 132, programs_per_sm=8, max_splits=64) == 64      # 132 wanted
    assert num_kv_splits(1, 8, 32768, 132, programs_per_sm=8, max_splits=32) == 32
    assert num_kv_splits(1, 8, 900, 132, programs_per_sm=8, max_splits=64) == 8          # 15 by length
    assert num_kv_splits(64, 8, 4096, 132, programs_per_sm=8, max_splits=64) == 2        # 1056 // 512
    assert num_kv_splits(256, 8, 2048, 132, programs_per_sm=8, max_splits=64) == 1


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_kernels_match_the_torch_reference_under_the_interpreter(tmp_path):
    """Write, decode (with and without forced splits) and prefill over bf16 and
    int8 caches, GQA, a sliding window, queries and values at fp16's edges: the
    benchmark's check section, run by Triton's interpreter in a subprocess (the
    interpreter is chosen when the kernels are defined)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kv_quant_gpu.py"), "--device", "cpu",
                    "--sections", "check", "--out", str(tmp_path)], env=env, check=True, capture_output=True,
                   timeout=600)
    rows = json.loads((tmp_path / "kv_quant_gpu.json").read_text())["figures"]["check"]
    names = {r["check"].split(" window")[0] for r in rows}
    assert {"attention bf16", "attention int8", "decode 4 splits int8", "write_kv int8"} <= names
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def _prompt_logprobs(llm: LLM, ids: list[int]) -> list[float]:
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]


def test_forked_samples_read_their_copied_blocks(model_dir):
    """n > 1 forks the prompt's partial last block (copy-on-write): each sample's
    log-probs equal a fresh int8 engine's scoring of prompt + sample, which copies nothing."""
    kwargs = dict(dtype="float32", block_size=4, kv_cache_dtype="int8")
    llm = LLM(str(model_dir), num_kv_blocks=200, **kwargs)
    prompt = list(range(10, 23))                                # 13 tokens: the last block is partly filled
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=9, logprobs=0,
                                                ignore_eos=True), use_tqdm=False)[0]
    fresh = LLM(str(model_dir), num_kv_blocks=200, enable_prefix_caching=False, **kwargs)
    for sample in out.outputs:
        ref = _prompt_logprobs(fresh, prompt + sample.token_ids)[len(prompt) - 1:]
        got = [entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs)]
        assert got == pytest.approx(ref, abs=2e-3)


def test_prefix_hits_and_beam_search_match_the_cache_off(model_dir):
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 300, (37,), generator=g).tolist()
    prompts = [system + torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (6,))]
    prompts += prompts[:2]
    kwargs = dict(dtype="float32", block_size=4, num_kv_blocks=60, max_num_batched_tokens=32, kv_cache_dtype="int8")
    on, off = LLM(str(model_dir), **kwargs), LLM(str(model_dir), enable_prefix_caching=False, **kwargs)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in on.generate(prompts, greedy, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in off.generate(prompts, greedy, use_tqdm=False)]
    assert on.engine.block_manager.stats.hit_rate > 0.3
    params = BeamSearchParams(beam_width=3, max_tokens=6)
    (beams_on,), (beams_off,) = on.beam_search([prompts[0]], params), off.beam_search([prompts[0]], params)
    assert [s.tokens for s in beams_on.sequences] == [s.tokens for s in beams_off.sequences]
    assert [s.cum_logprob for s in beams_on.sequences] == pytest.approx([s.cum_logprob for s in beams_off.sequences],
                                                                          abs=2e-3)


def test_int8_engine_stays_close_to_the_float_cache_and_smoothing_keeps_the_model(model_dir):
    """Key smoothing changes no q.k (fp32: the float-cache model with it folded in scores
    the same), and the int8 cache's log-probs stay near the float cache's (the real
    model's bound is in test_kv_quant_quality)."""
    ids = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    base = LLM(str(model_dir), dtype="float32", num_kv_blocks=40)
    ref = _prompt_logprobs(base, ids)
    smooth_keys(base.engine.runner.model, KEY_SMOOTHING_ALPHA["int8"])   # fold the smoothing into the float model
    assert _prompt_logprobs(base, ids) == pytest.approx(ref, abs=3e-4)   # float32 rounding of s
    quantized = _prompt_logprobs(LLM(str(model_dir), dtype="float32", num_kv_blocks=40, kv_cache_dtype="int8"), ids)
    # The tiny random model is far more peaked than a real one (mean log-prob about -12.5): int8 moves its
    # log-probs by 0.14 on average; a lost scale or a misplaced code moves them by whole units.
    change = torch.tensor(quantized) - torch.tensor(ref)
    assert 0 < change.abs().mean() < 0.25


def test_smoothing_factors_pair_rotary_channels_and_even_out_the_estimates():
    estimates = torch.tensor([[1.0, 100.0, 2.0, 1.0, 1.0, 4.0]])      # pairs (0,3) (1,4) (2,5)
    s = smoothing_factors(estimates, 1.0)
    assert torch.equal(s[:, :3], s[:, 3:])
    assert math.isclose(s[0, :3].log().mean().item(), 0.0, abs_tol=1e-6)
    pair = estimates[:, :3].hypot(estimates[:, 3:])
    assert torch.allclose(pair / s[:, :3], (pair / s[:, :3])[0, 0].expand(1, 3))   # alpha 1: all pairs equal


def test_pool_holds_the_sizing_tokens_and_the_start_line_says_int8(model_dir, caplog):
    config = load_model_config(str(model_dir))
    with caplog.at_level("INFO", logger="pagellm"):
        llm = LLM(str(model_dir), dtype="bfloat16", block_size=16, kv_cache_memory="1MiB", kv_cache_dtype="int8")
    memory = llm.engine.runner.memory
    assert memory.kv_bytes_per_token == kv_bytes_per_token(config, Precision(kv_bits=8))
    assert memory.num_blocks == 2**20 // (16 * memory.kv_bytes_per_token)
    assert memory.kv_cache_bytes == memory.num_blocks * 16 * memory.kv_bytes_per_token
    assert "KV pool int8" in caplog.text and f"= {memory.kv_tokens} tokens" in caplog.text
    for name in ("qwen2.5-0.5b", "llama-3-8b"):      # head_dim 64 and 128: >= 1.9x the tokens of bf16
        preset = load_model_config(name)
        bf16 = KVCacheSpec.for_model(preset, torch.bfloat16, 16).bytes_per_token
        for dtype in KV_FORMATS:
            quant = KVCacheSpec.for_model(preset, torch.bfloat16, 16, kv_cache_dtype=dtype).bytes_per_token
            assert quant == kv_bytes_per_token(preset, Precision(kv_bits=8))
            assert bf16 / quant >= 1.9


def test_fp8_on_a_gpu_without_it_says_so_and_suggests_int8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="fp8 support.*use kv_cache_dtype int8"):
        check_kv_cache_dtype("fp8", torch.device("cuda"))
    check_kv_cache_dtype("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM("unused", kv_cache_dtype="int4")


def test_memory_measure_with_kv_bits_8_runs_the_int8_cache(model_dir, capsys):
    from pagellm.cli import main
    assert main(["memory", str(model_dir), "--dtype", "fp32", "--kv-bits", "8", "--batch-size", "2",
                 "--context-len", "64", "--block-size", "16", "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    config = load_model_config(str(model_dir))
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.head_dim + 2)
    assert out["memory"]["kv_bytes_per_token"] == out["measured"]["kv_bytes_per_token"] == per_token
    assert out["memory"]["kv_bytes"] == out["measured"]["kv_cache_bytes"]


@pytest.mark.parametrize("method", ["dense", "int8", "int4", "gguf-q8_0"])
def test_scale_outputs_scales_each_output_channel_in_every_weight_format(method):
    """Key smoothing's seam: ``Linear.scale_outputs(f)`` makes the layer compute
    ``f * (x W^T + b)``, folded into dense/int8/int4 storage, applied after GGUF blocks."""
    from gguf import GGMLQuantizationType, quantize as gguf_quantize
    from pagellm.model.layers import DENSE, Linear
    from pagellm.quant.methods import GGUFLinearMethod, Int4LinearMethod, Int8LinearMethod
    from pagellm.model.gguf_loader import RawTensor

    torch.manual_seed(0)
    methods = {"dense": DENSE, "int8": Int8LinearMethod(), "int4": Int4LinearMethod(group_size=32),
               "gguf-q8_0": GGUFLinearMethod([GGMLQuantizationType.Q8_0] * 2)}
    layer = Linear(128, [8, 8], bias=True, method=methods[method], params_dtype=torch.float32)   # int4: runs of 128
    weights = torch.randn(16, 128)
    for shard in (0, 1):
        rows = weights[shard * 8:(shard + 1) * 8]
        if method.startswith("gguf"):
            data = gguf_quantize(rows.numpy(), GGMLQuantizationType.Q8_0)
            rows = RawTensor("w", "w", GGMLQuantizationType.Q8_0, tuple(rows.shape), data)
        layer.weight_loaders["weight"](rows, shard)
    layer.weight_loaders["bias"](torch.randn(16), None)
    x = torch.randn(5, 128)
    before = layer(x)
    factors = torch.rand(16) * 4 + 0.1
    layer.scale_outputs(factors)
    expected = before * factors     # int4 keeps its scales in fp16: each rounds by up to 2^-11
    torch.testing.assert_close(layer(x), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    assert (layer.output_scale is None) == (method != "gguf-q8_0")


def test_fp8_write_and_read_round_trip_through_the_pool():
    """The torch path stores fp8 codes as raw bytes (no index_copy for float8) and reads back what it wrote."""
    spec = KVCacheSpec(1, 2, 16, torch.float8_e4m3fn, 4, has_null_block=False)
    cache = KVCache(spec, 4, "cpu").layers[0]
    k, v = torch.randn(6, 2, 16) * 5, torch.randn(6, 2, 16)
    slots = torch.tensor([13, 2, 7, -1, 0, 9])
    write_kv_cache(k, v, cache.k, cache.v, slots, cache.k_scale, cache.v_scale)
    fmt = KV_FORMATS["fp8"]
    for x, pages, scales in ((k, cache.k, cache.k_scale), (v, cache.v, cache.v_scale)):
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            codes, scale = quantize(x[t], fmt)
            assert torch.equal(pages[slot // 4, slot % 4].view(torch.int8), codes.view(torch.int8))
            assert torch.equal(scales[slot // 4, :, slot % 4], scale)


def test_fp8_with_key_biases_warns_and_points_to_int8(model_dir, tmp_path, caplog):
    """fp8 keys lose too much on models whose key biases make a few channels carry the scores (Qwen2.5-1.5B:
    +36% perplexity, README): the engine says so at start-up; int8 on the same model and fp8 on a model
    without key biases start quietly."""
    llama_dir = make_tiny_hf_model(tmp_path, arch="llama")
    for folder, kv, warns in ((model_dir, "fp8", True), (model_dir, "int8", False), (llama_dir, "fp8", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pagellm"):
            LLM(str(folder), kv_cache_dtype=kv, num_kv_blocks=16, max_model_len=64)
        said = any("fp8" in r.getMessage() and "int8" in r.getMessage() for r in caplog.records)
        assert said == warns, (folder.name, kv)
