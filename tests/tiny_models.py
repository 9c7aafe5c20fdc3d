"""Tiny random models for tests: HF folders and GGUF files built on the fly (no hub access).

Public API (shared with the engine tests):

    make_tiny_hf_model(tmp_path, arch="llama", num_kv_heads=2, sliding_window=None,
                       tie_word_embeddings=False, seed=0) -> Path
        an HF folder (config.json, float32 safetensors, tokenizer with a chat template)
    make_tiny_tokenizer(folder) -> PreTrainedTokenizerFast
    write_tiny_gguf(hf_folder, path, qtype=GGMLQuantizationType.F32) -> Path
        the same weights as llama.cpp's converter would write them (q/k rows permuted for llama)

Sizes: hidden 64, 4 heads of 16, intermediate 128, vocab 320, 2 layers; every parameter
(norms and biases included) is random, so a swapped or misnamed tensor cannot go unnoticed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file

TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
            vocab_size=320, max_position_embeddings=256)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = "<|endoftext|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! This is a tiny tokenizer for tests, trained on a few lines of text.",
    "for i in range(10):\n    print(i * i)\n",
    "Paged attention keeps the key value cache in fixed size blocks.",
    "Llama, Qwen and Mistral models share one decoder layout.",
]


def make_tiny_tokenizer(folder: Path):
    """A byte-level BPE (Qwen2's pre-tokenizer) trained on CORPUS, saved to `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"] - 16, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=BOS, chat_template=CHATML_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_hf_config(arch: str = "llama", num_kv_heads: int = 2, sliding_window: int | None = None,
                   tie_word_embeddings: bool = False, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(TINY, num_key_value_heads=num_kv_heads, tie_word_embeddings=tie_word_embeddings,
                  bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS))
    common.update(overrides)
    if arch == "llama":
        if sliding_window is not None:
            raise ValueError("llama has no sliding window")
        return LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, **common)
    if arch == "mistral":
        return MistralConfig(rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=sliding_window, **common)
    if arch == "qwen2":
        return Qwen2Config(rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=sliding_window is not None,
                           sliding_window=sliding_window, max_window_layers=TINY["num_hidden_layers"], **common)
    raise ValueError(f"unknown arch {arch!r}")


def make_tiny_hf_model(tmp_path: Path, arch: str = "llama", num_kv_heads: int = 2,
                       sliding_window: int | None = None, tie_word_embeddings: bool = False,
                       seed: int = 0, max_shard_size: int | str | None = None, **config_overrides) -> Path:
    """Save a tiny random float32 model (config, safetensors, tokenizer) under `tmp_path`; return its folder.

    `max_shard_size` (e.g. "20KB") writes a sharded checkpoint with an index file.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, num_kv_heads, sliding_window, tie_word_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    tag = f"{arch}-kv{num_kv_heads}{'-tied' if tie_word_embeddings else ''}-seed{seed}"
    folder = Path(tmp_path) / (tag + ("-sharded" if max_shard_size else ""))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    make_tiny_tokenizer(folder)
    return folder


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: weights and biases ~ N(0, 0.5^2), norm weights ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.5 * noise)


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved HF folder (single or sharded), as the reference for loaders."""
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


# --- GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes it ---------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: within each head, interleave the two rotary halves' rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope_theta: float, head_dim: int, factor: float, low: float, high: float,
                        orig_ctx: int) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for llama3 rope scaling."""
    freqs = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(hf_folder: Path, path: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                    rope_factors: np.ndarray | None = None, with_tokenizer: bool = True,
                    extra_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
                    lm_head_qtype: GGMLQuantizationType | None = None) -> Path:
    """Convert a tiny HF folder to GGUF: gguf-py's tensor names, 1-D tensors in F32, matrices in
    `qtype`, q/k rows permuted for llama (not for qwen2), tokenizer and chat template in metadata.
    `rope_factors` adds a llama3 `rope_freqs` tensor; `extra_metadata(writer)` adds more keys;
    `lm_head_qtype` writes `output.weight` in that type, a tied model's too (its embedding a
    second time, as llama.cpp's converter wrote the Qwen2.5 files)."""
    cfg = json.loads((hf_folder / "config.json").read_text())
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope_theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(hf_folder.name)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope_theta)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if with_tokenizer:
        _add_tokenizer(w, hf_folder, cfg["vocab_size"])
    if extra_metadata is not None:
        extra_metadata(w)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, n_layers)
    state = hf_state_dict(hf_folder)
    if lm_head_qtype is not None:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings") and lm_head_qtype is None:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            data = llama_cpp_permute(data, n_head if ".q_proj." in hf_name else n_kv)
        tensor_qtype = lm_head_qtype if hf_name == "lm_head.weight" and lm_head_qtype is not None else qtype
        if data.ndim == 1 or tensor_qtype == GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif tensor_qtype == GGMLQuantizationType.F16:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, tensor_qtype), raw_dtype=tensor_qtype)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w: gguf.GGUFWriter, hf_folder: Path, vocab_size: int) -> None:
    """Byte-level BPE metadata as llama.cpp writes it for Qwen2, padded to `vocab_size` with [PADn]."""
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab.update(specials)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in specials else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[BOS])
    w.add_eos_token_id(vocab[EOS])
    w.add_pad_token_id(vocab[BOS])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
