"""open_checkpoint on tiny random HF folders and GGUF files built on the fly."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from pagellm.model.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from pagellm.model.gguf_loader import llama3_rope_scaling, unpermute_rope_rows  # noqa: E402

Q8_0 = GGMLQuantizationType.Q8_0
F32 = GGMLQuantizationType.F32
SAMPLES = [
    "Hello world! def add(a, b):\n    return a + b",
    "for i in range(10):\n\tprint(i * i)  # 12345 ÜÄ ok?",
    "<|im_start|>user\nThe lazy dog<|im_end|>\n",
]

# (id, arch, num_kv_heads, sliding_window, tied)
HF_CASES = [
    ("llama-gqa", "llama", 2, None, False),
    ("llama-tied", "llama", 4, None, True),
    ("qwen2-bias", "qwen2", 2, None, False),
    ("mistral-mqa", "mistral", 1, 64, False),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {cid: tm.make_tiny_hf_model(root, arch, kv, sliding_window=sw, tie_word_embeddings=tied)
            for cid, arch, kv, sw, tied in HF_CASES}


def reference(folder: Path) -> dict[str, torch.Tensor]:
    sd = tm.hf_state_dict(folder)
    if json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    return sd


def assert_same_tensors(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    got = ckpt.state_dict()
    assert sorted(got) == sorted(expected)
    assert ckpt.num_tensors() == len(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


# --- Hugging Face folders --------------------------------------------------------------------------

@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_folder_tensors_and_config(models, case):
    cid, arch, kv, sliding, tied = case
    ckpt = open_checkpoint(models[cid])
    assert ckpt.format == "hf" and ckpt.path == models[cid]
    c = ckpt.config
    assert (c.architecture, c.num_key_value_heads, c.tie_word_embeddings) == (arch, kv, tied)
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_hidden_layers) == (64, 4, 16, 2)
    assert c.attention_bias == (arch == "qwen2")
    assert c.sliding_window == sliding
    assert c.eos_token_ids == (2,) and c.bos_token_id == 0
    expected = reference(models[cid])
    assert ("lm_head.weight" in expected) == (not tied)
    assert ("model.layers.0.self_attn.q_proj.bias" in expected) == (arch == "qwen2")
    assert_same_tensors(ckpt, expected)
    assert c.num_parameters == sum(t.numel() for t in expected.values())


def test_hf_tensors_are_lazy_and_castable(models):
    ckpt = open_checkpoint(models["llama-gqa"])
    it = ckpt.tensors(dtype=torch.bfloat16)
    name, first = next(it)
    assert first.dtype == torch.bfloat16 and name in ckpt.tensor_names()
    assert sum(1 for _ in it) == ckpt.num_tensors() - 1


def test_hf_sharded(tmp_path):
    folder = tm.make_tiny_hf_model(tmp_path, "qwen2", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    assert_same_tensors(open_checkpoint(folder), reference(folder))


def test_hf_tokenizer_has_chat_template(models):
    tok = open_checkpoint(models["qwen2-bias"]).load_tokenizer()
    assert tok.is_fast and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok("x<|im_end|>").input_ids)[-1] == "<|im_end|>"


def test_hf_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_checkpoint(tmp_path)


def test_hf_missing_weights(models, tmp_path):
    shutil.copy(models["llama-gqa"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*only safetensors"):
        open_checkpoint(tmp_path)


def test_hf_missing_shard(tmp_path):
    folder = tm.make_tiny_hf_model(tmp_path, "llama", max_shard_size="20KB")
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        open_checkpoint(folder)


def test_hf_config_mismatch(models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models["llama-gqa"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensors: model.layers.2.*wrong shapes"):
        open_checkpoint(folder)


def test_raw_tensors_only_for_gguf(models):
    with pytest.raises(TypeError, match="only GGUF"):
        open_checkpoint(models["llama-gqa"]).raw_tensors()


def test_not_a_model(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="neither"):
        open_checkpoint(junk)
    with pytest.raises(ValueError, match="known names: qwen2.5-coder-0.5b"):
        open_checkpoint("no-such-model")


# --- GGUF ------------------------------------------------------------------------------------------

GGUF_CASES = [  # (hf model id, qtype)
    ("llama-gqa", F32), ("llama-gqa", Q8_0), ("llama-tied", F32),
    ("qwen2-bias", F32), ("qwen2-bias", Q8_0), ("mistral-mqa", Q8_0),
    ("llama-gqa", GGMLQuantizationType.F16), ("qwen2-bias", GGMLQuantizationType.BF16),
]
HALF_RTOL = {GGMLQuantizationType.F16: 2.0 ** -10, GGMLQuantizationType.BF16: 2.0 ** -7}


def q8_0_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-element error bound of Q8_0: half a step (absmax / 127) per 32-block, plus fp16 scale rounding."""
    blocks = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    return (blocks / 127 * 0.5 + blocks * 2.0 ** -10 + 1e-7).expand(-1, 32).reshape(x.shape)


@pytest.mark.parametrize("case", GGUF_CASES, ids=[f"{m}-{q.name}" for m, q in GGUF_CASES])
def test_gguf_tensors_and_config(models, tmp_path, case):
    model_id, qtype = case
    folder = models[model_id]
    path = tm.write_tiny_gguf(folder, tmp_path / "m.gguf", qtype)
    ckpt = open_checkpoint(path)
    hf = open_checkpoint(folder).config
    assert ckpt.format == "gguf" and ckpt.path == path
    assert ckpt.config.torch_dtype == {GGMLQuantizationType.F16: "float16",
                                       GGMLQuantizationType.BF16: "bfloat16"}.get(qtype, "float32")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "attention_bias", "tie_word_embeddings", "bos_token_id", "eos_token_ids"):
        assert getattr(ckpt.config, f) == getattr(hf, f), f
    # llama.cpp converts Mistral as llama; the GGUF says nothing of the sliding window.
    assert ckpt.config.architecture == {"mistral": "llama"}.get(hf.architecture, hf.architecture)
    expected = reference(folder)
    got = ckpt.state_dict()
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape and got[name].dtype == torch.float32, name
        if qtype == F32 or ref.ndim == 1:
            assert torch.equal(got[name], ref), name
        elif qtype in HALF_RTOL:
            torch.testing.assert_close(got[name], ref, rtol=HALF_RTOL[qtype], atol=1e-7, msg=name)
        else:
            err = (got[name] - ref).abs()
            assert (err <= q8_0_bound(ref)).all(), (name, err.max())
            assert err.max() > 0  # really quantized


def test_gguf_raw_tensors(models, tmp_path):
    path = tm.write_tiny_gguf(models["llama-gqa"], tmp_path / "m.gguf", Q8_0)
    ckpt = open_checkpoint(path)
    dense = ckpt.state_dict()
    raws = {r.name: r for r in ckpt.raw_tensors()}
    assert sorted(raws) == sorted(dense)
    q = raws["model.layers.0.self_attn.q_proj.weight"]
    assert q.gguf_name == "blk.0.attn_q.weight" and q.tensor_type == Q8_0 and q.is_quantized
    assert q.shape == (64, 64) and q.data.dtype == np.uint8 and q.data.shape == (64, 64 // 32 * 34)
    norm = raws["model.norm.weight"]
    assert norm.tensor_type == F32 and not norm.is_quantized
    for name, raw in raws.items():
        assert tuple(dense[name].shape) == raw.shape
        # the rows of the packed blocks are already in HF order
        values = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(raw.shape)
        assert np.array_equal(values, dense[name].numpy()), name


def test_gguf_matches_transformers_loader(models, tmp_path):
    """transformers' own GGUF loading (which reverses llama.cpp's permutation) agrees with ours."""
    from transformers import AutoModelForCausalLM

    path = tm.write_tiny_gguf(models["llama-gqa"], tmp_path / "m.gguf", Q8_0)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    for name, tensor in open_checkpoint(path).tensors():
        assert torch.equal(theirs[name], tensor), name


def test_gguf_tokenizer(models, tmp_path):
    folder = models["qwen2-bias"]
    path = tm.write_tiny_gguf(folder, tmp_path / "m.gguf")
    tok = open_checkpoint(path).load_tokenizer()
    ref = open_checkpoint(folder).load_tokenizer()
    assert tok.is_fast and tok.chat_template == tm.CHATML_TEMPLATE
    for text in SAMPLES:
        assert tok(text).input_ids == ref(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (tok.eos_token, tok.bos_token) == (tm.EOS, tm.BOS)


def test_gguf_chat_template_set_from_metadata(models, tmp_path, monkeypatch):
    """If transformers drops the template, the loader sets it from `tokenizer.chat_template`."""
    from transformers import AutoTokenizer

    path = tm.write_tiny_gguf(models["qwen2-bias"], tmp_path / "m.gguf")
    real = AutoTokenizer.from_pretrained

    def without_template(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.chat_template = None
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", without_template)
    assert open_checkpoint(path).load_tokenizer().chat_template == tm.CHATML_TEMPLATE


def test_gguf_folder_with_one_file(models, tmp_path):
    path = tm.write_tiny_gguf(models["qwen2-bias"], tmp_path / "m.gguf")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "gguf" and ckpt.path == path


def test_gguf_rope_scaling_metadata(models, tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    path = tm.write_tiny_gguf(models["llama-gqa"], tmp_path / "m.gguf", extra_metadata=linear)
    assert open_checkpoint(path).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_gguf_llama3_rope_freqs(models, tmp_path):
    factors = tm.llama3_rope_factors(10000.0, 16, factor=8.0, low=1.0, high=8.0, orig_ctx=2048)
    path = tm.write_tiny_gguf(models["llama-gqa"], tmp_path / "m.gguf", rope_factors=factors)
    ckpt = open_checkpoint(path)
    assert ckpt.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 8.0, "original_max_position_embeddings": 2048}
    assert "rope_freqs.weight" not in ckpt.tensor_names()


@pytest.mark.parametrize("theta,head_dim,factor,high,orig", [
    (500000.0, 128, 8.0, 4.0, 8192),   # Llama 3.1
    (500000.0, 64, 32.0, 4.0, 8192),   # Llama 3.2 1B
    (500000.0, 128, 16.0, 2.0, 4096),
])
def test_llama3_rope_scaling_recovered(theta, head_dim, factor, high, orig):
    factors = tm.llama3_rope_factors(theta, head_dim, factor, 1.0, high, orig)
    assert llama3_rope_scaling(factors.astype(np.float64), theta, head_dim) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": high, "original_max_position_embeddings": orig}


def test_gguf_unsupported(models, tmp_path):
    w = gguf.GGUFWriter(tmp_path / "g.gguf", "gemma3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(ValueError, match="'gemma3' is not supported"):
        open_checkpoint(tmp_path / "g.gguf")


def test_gguf_unknown_tensor(models, tmp_path):
    def extra(w):
        w.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))

    path = tm.write_tiny_gguf(models["llama-gqa"], tmp_path / "m.gguf", extra_metadata=extra)
    with pytest.raises(ValueError, match="attn_q_norm.*no Hugging Face equivalent"):
        open_checkpoint(path)


# --- the llama q/k un-permutation ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 8), cols=st.integers(0, 3))
def test_unpermute_inverts_llama_cpp(heads, half, cols):
    shape = (heads * 2 * half,) + ((cols,) if cols else ())
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    permuted = tm.llama_cpp_permute(w, heads)
    assert np.array_equal(unpermute_rope_rows(permuted, heads), w)
    if half > 1:
        assert not np.array_equal(permuted, w)
    try:  # transformers' own reversal, where this version has it
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    except ImportError:
        return
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads), w)


def _rope_neox(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """HF Llama: rotate dims (j, j + d/2)."""
    d = x.shape[-1]
    ang = pos[:, None, None] * theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's llama rope: rotate dims (2j, 2j + 1)."""
    d = x.shape[-1]
    ang = pos[:, None, None] * theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_unpermuted_weights_give_llama_cpp_attention_scores(models, tmp_path):
    """From first principles: HF rope on our q/k == llama.cpp rope on the file's permuted q/k."""
    path = tm.write_tiny_gguf(models["llama-gqa"], tmp_path / "m.gguf")
    ckpt = open_checkpoint(path)
    c = ckpt.config
    reader = gguf.GGUFReader(path)
    stored = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float64)) for t in reader.tensors}
    ours = {n: t.double() for n, t in ckpt.tensors()}
    x = torch.randn(5, c.hidden_size, dtype=torch.float64)
    pos = torch.arange(5, dtype=torch.float64) * 7

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).view(5, c.num_attention_heads, c.head_dim), pos, c.rope_theta)
        k = rope((x @ wk.T).view(5, c.num_key_value_heads, c.head_dim), pos, c.rope_theta)
        k = k.repeat_interleave(c.num_attention_heads // c.num_key_value_heads, dim=1)
        return torch.einsum("qhd,khd->hqk", q, k)

    hf = scores(ours["model.layers.0.self_attn.q_proj.weight"], ours["model.layers.0.self_attn.k_proj.weight"],
                _rope_neox)
    cpp = scores(stored["blk.0.attn_q.weight"], stored["blk.0.attn_k.weight"], _rope_interleaved)
    assert torch.allclose(hf, cpp, atol=1e-9)
    assert not torch.allclose(hf, scores(stored["blk.0.attn_q.weight"], stored["blk.0.attn_k.weight"], _rope_neox))
