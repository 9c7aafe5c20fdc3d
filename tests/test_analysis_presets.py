"""Model presets, hardware presets and the MODEL argument resolver (config.json, folder, GGUF)."""
import json

import numpy as np
import pytest

from pagellm.analysis.hardware import HARDWARE_PRESETS, get_hardware, match_device_name, override
from pagellm.model.model_spec import load_model_config
from pagellm.model.presets import PRESETS, load_preset, preset_hf_dict

REQUIRED = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b",
            "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]

# Parameter counts the model publishers report (exact, from the checkpoints).
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", REQUIRED)
def test_required_presets_build(name):
    config = load_preset(name)
    assert config.name == name
    assert config.head_dim * config.num_attention_heads == config.hidden_size


@pytest.mark.parametrize("name,params", PUBLISHED_PARAMS.items())
def test_preset_shapes_give_published_parameter_counts(name, params):
    assert load_preset(name).num_parameters == params


def test_preset_details_are_faithful():
    mistral = load_preset("mistral-7b")
    assert mistral.sliding_window == 4096 and mistral.num_key_value_heads == 8
    qwen = load_preset("qwen2.5-0.5b")
    assert qwen.tie_word_embeddings and qwen.attention_bias and qwen.sliding_window is None
    assert load_preset("llama-3-8b").rope_theta == 500000.0
    assert load_preset("llama-3.1-8b").rope_scaling["rope_type"] == "llama3"
    coder = load_preset("qwen2.5-coder-1.5b")
    assert (coder.num_hidden_layers, coder.hidden_size, coder.num_attention_heads, coder.num_key_value_heads,
            coder.intermediate_size, coder.vocab_size) == (28, 1536, 12, 2, 8960, 151936)
    small = load_preset("qwen2.5-coder-0.5b")
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.num_key_value_heads,
            small.intermediate_size, small.vocab_size) == (24, 896, 14, 2, 4864, 151936)


def test_preset_names_case_insensitive_and_hub_ids():
    assert load_preset("LLaMA-2-7B") == load_preset("llama-2-7b")
    assert load_preset("meta-llama/Llama-2-7b-hf").num_parameters == PUBLISHED_PARAMS["llama-2-7b"]
    assert load_preset("Mistral-7B-v0.1").sliding_window == 4096


def test_preset_dict_is_a_copy():
    d = preset_hf_dict("llama-2-7b")
    d["hidden_size"] = 1
    assert PRESETS["llama-2-7b"]["hidden_size"] == 4096


def test_unknown_preset_message():
    with pytest.raises(ValueError, match="unknown model preset 'llama-9'.*llama-2-7b"):
        load_preset("llama-9")
    with pytest.raises(ValueError, match="neither a file, a folder nor a preset"):
        load_model_config("no-such-model")


def test_hardware_presets():
    names = {"A6000", "A100-40G", "A100-80G", "H100-SXM", "H100-PCIe", "H200", "L40S", "RTX-4090"}
    assert names <= {h.name for h in HARDWARE_PRESETS.values()}
    for hw in HARDWARE_PRESETS.values():
        assert hw.source == "datasheet"
        assert hw.memory_bytes > 0 and hw.bandwidth > 0 and hw.fp16_flops > 0 and hw.int8_ops > 0
    h100 = get_hardware("h100-sxm")
    assert (h100.memory_bytes, h100.bandwidth, h100.fp16_flops) == (80 * 2**30, 3.35e12, 989.4e12)
    assert get_hardware("A100-80G").fp8_flops is None          # Ampere has no FP8
    assert get_hardware("rtx4090").name == "RTX-4090"
    with pytest.raises(ValueError, match="unknown hardware 'B200'"):
        get_hardware("B200")


def test_hardware_override_and_device_names():
    hw = override(get_hardware("H100-SXM"), bandwidth=3e12, flops=500e12)
    assert hw.bandwidth == 3e12 and hw.fp16_flops == 500e12 and hw.int8_ops == pytest.approx(1000e12, rel=1e-3)
    assert "user" in hw.source
    assert match_device_name("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert match_device_name("NVIDIA A100-SXM4-40GB").name == "A100-40G"
    assert match_device_name("NVIDIA GeForce RTX 4090").name == "RTX-4090"
    assert match_device_name("Tesla T4") is None


def test_config_json_file_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-3-8b"]))
    from_file = load_model_config(str(tmp_path / "config.json"))
    from_folder = load_model_config(str(tmp_path))
    assert from_file.num_key_value_heads == from_folder.num_key_value_heads == 8
    assert from_file.num_parameters == PUBLISHED_PARAMS["llama-3-8b"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_model_config(str(tmp_path / "bad.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither a config.json nor a .gguf"):
        load_model_config(str(empty))


def _write_tiny_gguf(path, tied: bool, bias: bool):
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2" if bias else "llama")
    w.add_name("tiny-test")
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(160)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_tensor("token_embd.weight", np.zeros((300, 64), np.float16))
    if not tied:
        w.add_tensor("output.weight", np.zeros((300, 64), np.float16))
    for layer in range(2):
        q8 = gguf.quants.quantize(np.ones((64, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{layer}.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        if bias:
            w.add_tensor(f"blk.{layer}.attn_q.bias", np.zeros(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_gguf_metadata_to_config(tmp_path, tied, bias):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tied, bias)
    config = load_model_config(str(path))
    assert config.architecture == ("qwen2" if bias else "llama")
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (300, 64, 160, 2, 4, 1, 16)
    assert config.max_position_embeddings == 512
    assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is tied
    assert config.attention_bias is bias
    assert config.name == "tiny-test"
    # A folder holding just that file resolves to the same model.
    assert load_model_config(str(tmp_path)) == config


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_model_config_matches_the_engine_loader(tmp_path, arch):
    """The analyzer's config for an HF folder or a GGUF is the one open_checkpoint builds."""
    from pagellm.model.checkpoint import open_checkpoint
    from tiny_models import make_tiny_hf_model, write_tiny_gguf

    folder = make_tiny_hf_model(tmp_path, arch=arch, num_kv_heads=2)
    hf_config = open_checkpoint(folder).config
    assert load_model_config(str(folder)) == hf_config
    assert load_model_config(str(folder / "config.json")) == hf_config
    gguf_file = write_tiny_gguf(folder, tmp_path / f"{arch}.gguf")
    config = load_model_config(str(gguf_file))
    assert config == open_checkpoint(gguf_file).config
    assert config.name == folder.name and config.num_key_value_heads == 2
    assert config.num_parameters == hf_config.num_parameters


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        load_model_config(str(junk))
