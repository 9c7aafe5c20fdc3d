"""The engine's memory accounting against closed forms, and `pagellm memory --measure`."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.cli import main
from pagellm.engine.kv_cache import KVCacheSpec
from pagellm.model.checkpoint import open_checkpoint
from pagellm.model.layers import LayerFactory
from pagellm.model.llama import LlamaForCausalLM
from pagellm.model.model_spec import load_model_config
from pagellm.model.presets import preset_names
from pagellm.model.zoo import ZOO
from pagellm.sizing import Precision, kv_bytes_per_token, weights_bytes
from test_engine_parity import hf_greedy
from tiny_models import make_tiny_hf_model


def closed_form(path):
    c = open_checkpoint(path).config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4       # fp32 K and V
    return c.num_parameters * 4, per_token


def test_pool_sized_in_blocks_from_kv_budget_and_from_total_budget(tiny_llama):
    weights, per_token = closed_form(tiny_llama)
    by_kv = LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="1MiB").engine.runner.memory
    assert by_kv.weights_bytes == weights
    assert by_kv.kv_bytes_per_token == per_token
    assert by_kv.num_blocks == 2**20 // (4 * per_token)
    assert by_kv.kv_cache_bytes == by_kv.num_blocks * 4 * per_token

    total = 8 * 2**20
    by_total = LLM(str(tiny_llama), dtype="float32", block_size=4, gpu_memory=total,
                   max_num_batched_tokens=64, max_num_seqs=4).engine.runner.memory
    assert by_total.num_blocks == (total - weights - by_total.activation_bytes) // (4 * per_token)
    with pytest.raises(ValueError, match="no room"):
        LLM(str(tiny_llama), dtype="float32", gpu_memory=weights)


def test_memory_measure_puts_the_engine_beside_the_prediction(tiny_llama, capsys):
    weights, per_token = closed_form(tiny_llama)
    assert main(["memory", str(tiny_llama), "--dtype", "fp32", "--batch-size", "2", "--context-len", "64",
                 "--block-size", "16", "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"]["weights_bytes"] == out["measured"]["weights_bytes"] == weights
    assert out["memory"]["kv_bytes_per_token"] == out["measured"]["kv_bytes_per_token"] == per_token
    assert out["measured"]["num_blocks"] == 2 * 64 // 16


def test_sliding_window_gives_back_blocks_behind_the_window(tmp_path):
    folder = make_tiny_hf_model(tmp_path, arch="mistral", num_kv_heads=2, sliding_window=8)
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64, max_num_batched_tokens=8)
    engine = llm.engine
    prompt = list(range(10, 30))
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    peak, tokens = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        peak = max(peak, engine.block_manager.num_used_blocks)
    # window 8 + an 8-token chunk, in blocks of 4, plus the partly filled one: 5; all 80 tokens would need 20.
    assert peak <= 5
    assert engine.block_manager.num_used_blocks == 0
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert tokens == hf_greedy(hf, prompt, 60)


@pytest.mark.parametrize("name", preset_names() + [n for n in ZOO if ZOO[n].is_installed()])
def test_engine_layout_matches_the_analyzer_for_every_preset_and_zoo_model(name):
    """The model the engine builds (on the meta device: no memory) holds the
    analyzer's weight bytes, and its KV cache the analyzer's bytes per token."""
    config = load_model_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, LayerFactory(torch.bfloat16))
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == pytest.approx(weights_bytes(config, Precision()), rel=0.01)
    assert KVCacheSpec.for_model(config, torch.bfloat16, 16).bytes_per_token == kv_bytes_per_token(config, Precision())


def test_memory_measure_agrees_on_the_default_model(qwen_gguf, capsys):
    """`pagellm memory qwen2.5-coder-0.5b --measure`: the real GGUF's untied LM head on both sides."""
    assert main(["memory", "qwen2.5-coder-0.5b", "--context-len", "1024", "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    predicted, measured = out["memory"], out["measured"]
    assert measured["weights_bytes"] == pytest.approx(predicted["weights_bytes"], rel=0.01)
    assert measured["kv_bytes_per_token"] == predicted["kv_bytes_per_token"]
    assert measured["kv_cache_bytes"] == predicted["kv_bytes"]
    assert measured["activation_bytes"] == pytest.approx(predicted["activation_bytes"], rel=0.10)
