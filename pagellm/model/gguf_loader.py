"""GGUF files (llama.cpp's format): config from metadata, weights renamed to HF names.

Three things differ from a Hugging Face checkpoint and are undone here:

* Names: `blk.N.attn_q.weight` etc. become `model.layers.N.self_attn.q_proj.weight`.
* Quantization: tensors are dequantized with `gguf.quants.dequantize`, which returns
  float32 already in (out_features, in_features) order, the reverse of GGUF's shape.
* Rope layout (llama architecture only): llama.cpp's converter permutes the rows of
  `attn_q`/`attn_k` (see `unpermute_rope_rows`). Qwen2 uses NeoX rope and is not permuted.

`GGUFWeights.raw_tensors()` hands out the stored (still quantized) blocks for a later
quantized-weights path, with the rope permutation already undone (it moves whole rows,
and quantization blocks never span rows, so it is exact on the packed bytes).

Some files hold a tied model's one matrix twice: llama.cpp's converter wrote the Qwen2.5
0.5B/1.5B embeddings as both `token_embd` and `output`, in two block types (Q5_0 and Q8_0;
Q4_K and Q6_K). Their config says untied, and the float path serves them as written;
`GGUFWeights.sharing_embedding()` is the same file tied, its LM head serving the lookups
too, for the paths that keep blocks (`holds_embedding_twice` says when).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize


log = logging.getLogger(__name__)

# GGUF `general.architecture` -> HF `model_type`
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp's converter permuted for its interleaved rope.
_PERMUTED_ARCHITECTURES = ("llama",)

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors that are not weights of the HF model; their content goes into the config instead.
_METADATA_TENSORS = ("rope_freqs.weight",)
# `holds_embedding_twice`: rows compared, and the most their difference may be (relative, Frobenius)
TIED_SAMPLE_ROWS = 64
TIED_MAX_DIFFERENCE = 0.2


def hf_tensor_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor; ValueError if it has none."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (on dim 0; any trailing dims ride along).

    HF Llama rotates dimension pairs (j, j + d/2) of each head ("rotate_half"); llama.cpp's
    llama rope rotates adjacent pairs (2j, 2j + 1). Its converter therefore reorders each
    head's d rows as [0, d/2, 1, d/2 + 1, ...], i.e. it views the rows as
    (heads, 2, d/2) and swaps the last two axes. We view them as (heads, d/2, 2) and swap
    back. `n_heads` is the number of query heads for q and of key/value heads for k.
    """
    half = w.shape[0] // n_heads // 2
    if n_heads * 2 * half != w.shape[0]:
        raise ValueError(f"{w.shape[0]} rows do not split into {n_heads} heads of even size")
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class RawTensor:
    """One tensor as stored in the GGUF, under its HF name.

    `data` is the reader's memory map (uint8 blocks of shape (rows, bytes per row) for
    quantized types, plain floats otherwise); q/k of llama files are an unpermuted copy.
    `shape` is the HF (logical) shape.
    """

    name: str
    gguf_name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray = field(repr=False)

    @property
    def is_quantized(self) -> bool:
        return self.tensor_type not in (
            GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

    def dequantize(self) -> torch.Tensor:
        """Float32 values in HF shape (a fresh, writable tensor)."""
        values = dequantize(self.data, self.tensor_type).reshape(self.shape)
        if not values.flags.writeable or not values.flags.c_contiguous:
            values = np.array(values, copy=True, order="C")
        return torch.from_numpy(values)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (9.9999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def _ggml_shape(t: ReaderTensor) -> tuple[int, ...]:
    """GGUF lists dimensions innermost first; torch wants them outermost first."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def config_dict_from_gguf(reader: GGUFReader) -> dict[str, Any]:
    """An HF-style `config.json` dict built from a GGUF's metadata (see `ModelConfig.from_hf_dict`)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    d: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "_name_or_path": _field(reader, "general.name", ""),
        "hidden_size": int(meta("embedding_length")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "vocab_size": _vocab_size(reader, tensors),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "torch_dtype": _file_dtype(reader),
    }
    head_dim = meta("attention.key_length") or (meta("rope.dimension_count") if arch == "llama" else None)
    if head_dim:
        d["head_dim"] = int(head_dim)
    d["rope_scaling"] = _rope_scaling(reader, arch, tensors, d)
    d.update(_special_token_ids(reader))
    return d


def holds_embedding_twice(tensors: dict[str, ReaderTensor]) -> bool:
    """Whether `output.weight` is `token_embd.weight` again, quantized otherwise: sampled
    rows of the two differ by their quantization error alone (relative 0.044 in the
    Qwen2.5-Coder-0.5B file, 0.075 in the 1.5B), where two distinct matrices of like
    scale differ by about sqrt(2)."""
    embed, head = tensors.get("token_embd.weight"), tensors.get("output.weight")
    if embed is None or head is None or _ggml_shape(embed) != _ggml_shape(head):
        return False
    rows = np.unique(np.linspace(0, _ggml_shape(head)[0] - 1, TIED_SAMPLE_ROWS).astype(np.int64))
    a, b = (dequantize(np.asarray(t.data)[rows], t.tensor_type).reshape(len(rows), -1) for t in (embed, head))
    return bool(np.linalg.norm(a - b) <= TIED_MAX_DIFFERENCE * np.linalg.norm(b))


def _vocab_size(reader: GGUFReader, tensors: dict[str, ReaderTensor]) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else None
    rows = _ggml_shape(tensors["token_embd.weight"])[0] if "token_embd.weight" in tensors else None
    if n_tokens is not None and rows is not None and n_tokens != rows:
        log.warning("GGUF has %d tokens but %d embedding rows; using the embedding rows", n_tokens, rows)
        return rows
    if n_tokens is None and rows is None:
        raise ValueError("GGUF has neither tokenizer.ggml.tokens nor token_embd.weight")
    return n_tokens if n_tokens is not None else rows  # type: ignore[return-value]


def _file_dtype(reader: GGUFReader) -> str:
    """The file's native precision: a half type if its matrices are stored in one, else
    float32 (dequantized values need it to be exact). `tensors()` always yields float32."""
    types = {t.tensor_type for t in reader.tensors}
    if GGMLQuantizationType.BF16 in types:
        return "bfloat16"
    if GGMLQuantizationType.F16 in types:
        return "float16"
    return "float32"


def _special_token_ids(reader: GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    # End-of-turn / end-of-message ids (Llama 3 instruct) also end generation.
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


def _rope_scaling(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor],
                  d: dict[str, Any]) -> dict[str, Any] | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*`, or from a llama3 `rope_freqs` tensor."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind and kind != "none":
        scaling: dict[str, Any] = {"rope_type": kind}
        for gguf_key, hf_key, cast in (
                ("factor", "factor", _f32),
                ("original_context_length", "original_max_position_embeddings", int),
                ("attn_factor", "attention_factor", _f32),
                ("yarn_beta_fast", "beta_fast", _f32),
                ("yarn_beta_slow", "beta_slow", _f32)):
            value = _field(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = cast(value)
        return scaling
    if "rope_freqs.weight" in tensors:
        factors = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        return llama3_rope_scaling(np.asarray(factors, dtype=np.float64).reshape(-1), d["rope_theta"], head_dim)
    return None


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's per-frequency `rope_freqs` divisors.

    llama.cpp stores, per frequency, the divisor llama3 scaling applies: 1 for high
    frequencies, `factor` for low ones, and in between 1 / ((1 - s) / factor + s) with
    s = (orig_ctx / wavelen - low) / (high - low). s is linear in 1 / wavelen, so a line fit
    over the in-between frequencies gives orig_ctx / (high - low) and -low / (high - low);
    with low_freq_factor = 1 (every Llama 3.x release) that fixes high and orig_ctx. Any
    triple with the same two ratios yields the same frequencies, so the result is exact.
    """
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    inv_freq = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = inv_freq / (2 * np.pi)  # 1 / wavelen
    s = (1.0 / factors - 1.0 / factor) / (1.0 - 1.0 / factor)
    between = (s > 1e-4) & (s < 1 - 1e-4)
    if between.sum() < 2:
        log.warning("rope_freqs has fewer than two interpolated frequencies; assuming linear scaling")
        return {"rope_type": "linear", "factor": _f32(factor)}
    slope, intercept = np.polyfit(x[between], s[between], 1)
    low = 1.0
    span = -low / intercept
    return {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": low,
        "high_freq_factor": round(low + span, 4),
        "original_max_position_embeddings": int(round(slope * span)),
    }


@dataclass
class GGUFWeights:
    """One opened GGUF file: its config dict, tensors by HF name, and tokenizer."""

    path: Path
    reader: GGUFReader = field(repr=False)
    config_dict: dict[str, Any] = field(repr=False)
    _tensors: dict[str, ReaderTensor] = field(repr=False)  # HF name -> reader tensor

    @classmethod
    def open(cls, path: Path) -> "GGUFWeights":
        reader = GGUFReader(path)  # memory-maps the file; parsing the vocab takes a few seconds
        config_dict = config_dict_from_gguf(reader)
        tensors = {hf_tensor_name(t.name): t for t in reader.tensors if t.name not in _METADATA_TENSORS}
        return cls(path, reader, config_dict, tensors)

    @property
    def architecture(self) -> str:
        return _field(self.reader, "general.architecture")

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: _ggml_shape(t) for name, t in self._tensors.items()}

    def sharing_embedding(self) -> "GGUFWeights":
        """This file tied (`tie_word_embeddings`, no `lm_head.weight`: `output.weight`
        serves as `model.embed_tokens.weight`) when it holds one matrix twice
        (`holds_embedding_twice`), else itself."""
        if not holds_embedding_twice({t.name: t for t in self.reader.tensors}):
            return self
        tensors = {name: t for name, t in self._tensors.items() if name != "model.embed_tokens.weight"}
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
        return replace(self, config_dict=self.config_dict | {"tie_word_embeddings": True}, _tensors=tensors)

    def tensor_types(self) -> dict[str, GGMLQuantizationType]:
        return {name: t.tensor_type for name, t in self._tensors.items()}

    def raw_tensor(self, name: str) -> RawTensor:
        t = self._tensors[name]
        shape = _ggml_shape(t)
        data = t.data
        m = _BLOCK_RE.match(t.name)
        if self.architecture in _PERMUTED_ARCHITECTURES and m and m.group(2) in ("attn_q", "attn_k"):
            cfg = self.config_dict
            heads = cfg["num_attention_heads"] if m.group(2) == "attn_q" else cfg["num_key_value_heads"]
            data = unpermute_rope_rows(np.asarray(data), heads)
        return RawTensor(name, t.name, t.tensor_type, shape, data)

    def raw_tensors(self) -> Iterator[RawTensor]:
        for name in self._tensors:
            yield self.raw_tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        return self.raw_tensor(name).dequantize()

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for raw in self.raw_tensors():
            tensor = raw.dequantize()
            yield raw.name, tensor if dtype is None else tensor.to(dtype)

    def chat_template(self) -> str | None:
        return _field(self.reader, "tokenizer.chat_template")

    def load_tokenizer(self, cache_dir: Path | None = None):
        """The fast tokenizer transformers builds from the metadata, with the chat template.

        Building it takes seconds for a 150k vocabulary, so with `cache_dir` the result is
        saved there (as tokenizer.json etc.) and reused while the GGUF's size and mtime match.
        """
        if cache_dir is not None:
            cached = _load_cached_tokenizer(cache_dir, self.path)
            if cached is not None:
                return cached
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        if not getattr(tokenizer, "chat_template", None) and self.chat_template():
            tokenizer.chat_template = self.chat_template()
        if cache_dir is not None:
            _save_cached_tokenizer(tokenizer, cache_dir, self.path)
        return tokenizer


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"gguf": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_cached_tokenizer(cache_dir: Path, gguf_path: Path):
    stamp_file = cache_dir / "source.json"
    try:
        if json.loads(stamp_file.read_text()) != _stamp(gguf_path):
            return None
    except (OSError, ValueError):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cache_dir)


def _save_cached_tokenizer(tokenizer, cache_dir: Path, gguf_path: Path) -> None:
    """Save into a temp folder and rename it into place, so readers never see half a save."""
    tmp: Path | None = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(_stamp(gguf_path)))
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(tmp, cache_dir)
    except OSError as e:  # a read-only cache is not fatal
        log.warning("could not cache the tokenizer in %s: %s", cache_dir, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
