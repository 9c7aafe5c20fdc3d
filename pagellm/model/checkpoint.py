"""The one entry point the engine uses to read a model: `open_checkpoint`.

    ckpt = open_checkpoint("qwen2.5-coder-0.5b")      # zoo name, HF folder or .gguf file
    ckpt.config                                       # ModelConfig
    for name, tensor in ckpt.tensors():               # HF names and (out, in) shapes, lazily
        ...
    tokenizer = ckpt.load_tokenizer()                 # fast tokenizer with chat template

Whatever the format, tensors come out under Hugging Face parameter names
(`model.layers.0.self_attn.q_proj.weight`, ...) in HF layout; `lm_head.weight` is absent
when the embeddings are tied. Names and shapes are checked against the config when the
checkpoint is opened, so a mismatch fails before any weight is read.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pagellm.model.config import ModelConfig, expected_shapes, weight_name
from pagellm.model.gguf_loader import GGUFWeights, RawTensor
from pagellm.model.hf_loader import HFWeights, LazySlice, is_hf_folder
from pagellm.model.zoo import ZOO, cache_dir, model_path


@dataclass
class Checkpoint:
    config: ModelConfig
    path: Path
    format: str  # "hf" | "gguf"
    source: HFWeights | GGUFWeights = field(repr=False, compare=False)
    tokenizer_cache: Path | None = field(default=None, repr=False, compare=False)

    def tensor_names(self) -> list[str]:
        return self.source.tensor_names()

    def num_tensors(self) -> int:
        return len(self.source.tensor_names())

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.source.tensor_shapes()

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs, read one at a time. GGUF weights come dequantized to
        float32 and HF weights as stored, unless `dtype` casts each on the way out."""
        return self.source.tensors(dtype)

    def tensor_parts(self) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
        """As ``tensors``, but an HF checkpoint's tensors come unread (``LazySlice``), so a
        tensor-parallel rank reads only the slices it keeps."""
        return self.source.slices() if isinstance(self.source, HFWeights) else self.tensors()

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by HF name (float32 for GGUF, as stored for HF); KeyError if absent."""
        return self.source.tensor(name)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return dict(self.tensors(dtype))

    def raw_tensors(self) -> Iterator[RawTensor]:
        """GGUF only: the stored (possibly quantized) blocks under HF names, q/k unpermuted."""
        return self._gguf().raw_tensors()

    def tensor_types(self):
        """GGUF only: each tensor's GGML type, by HF name."""
        return self._gguf().tensor_types()

    def block_tensors(self) -> Iterator[tuple[str, torch.Tensor | RawTensor]]:
        """GGUF only: quantized tensors as their blocks (``RawTensor``), float ones as float32 tensors."""
        for raw in self.raw_tensors():
            yield raw.name, raw if raw.is_quantized else raw.dequantize()

    def sharing_embedding(self) -> "Checkpoint":
        """A GGUF file tied where it holds a tied model's matrix twice
        (``GGUFWeights.sharing_embedding``), so that matrix is loaded once; else itself."""
        source = self.source.sharing_embedding() if isinstance(self.source, GGUFWeights) else self.source
        if source is self.source:
            return self
        return replace(self, config=replace(self.config, tie_word_embeddings=True), source=source)

    def _gguf(self) -> GGUFWeights:
        if not isinstance(self.source, GGUFWeights):
            raise TypeError(f"{self.path} is a {self.format} checkpoint; only GGUF files hold quantized tensors")
        return self.source

    def load_tokenizer(self):
        """A transformers fast tokenizer (`PreTrainedTokenizerBase`) with its chat template."""
        if isinstance(self.source, GGUFWeights):
            return self.source.load_tokenizer(cache_dir=self.tokenizer_cache)
        return self.source.load_tokenizer()


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Open a zoo name, a Hugging Face folder or a .gguf file (weights are read lazily)."""
    path = model_path(model)
    zoo_name = str(model) if str(model) in ZOO and not Path(str(model)).exists() else None
    if path.is_dir():
        path = _pick_in_folder(path)
    if path.is_dir():
        weights = HFWeights.open(path)
        config = ModelConfig.from_hf_dict(weights.config_dict, name=path.name)
        ckpt = Checkpoint(config, path, "hf", weights)
    elif _is_gguf(path):
        weights = GGUFWeights.open(path)
        name = zoo_name or weights.config_dict.get("_name_or_path") or path.stem
        config = ModelConfig.from_hf_dict(weights.config_dict, name=name)
        ckpt = Checkpoint(config, path, "gguf", weights, _tokenizer_cache_for(path))
    else:
        raise ValueError(f"{path} is neither a Hugging Face model folder nor a GGUF file")
    check_tensors(ckpt.config, ckpt.tensor_shapes(), source=str(path))
    return ckpt


def _pick_in_folder(folder: Path) -> Path:
    """An HF folder stays a folder; a folder holding exactly one .gguf (and no config) means that file."""
    if is_hf_folder(folder):
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ValueError(f"{folder} holds several GGUF files ({', '.join(g.name for g in ggufs)}); name one")
    raise FileNotFoundError(f"{folder / 'config.json'} not found: {folder} is not a Hugging Face model folder")


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _tokenizer_cache_for(path: Path) -> Path | None:
    """Zoo files live in the cache folder; their converted tokenizers are cached beside them."""
    try:
        in_cache = path.resolve().parent == cache_dir().resolve()
    except OSError:
        return None
    return path.parent / f"{path.stem}.tokenizer" if in_cache else None


def check_tensors(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """ValueError naming missing, unexpected or misshapen tensors (a quantized
    matrix's parts count as its weight, whose shape only its method knows)."""
    expected = expected_shapes(config, bias_names={n for n in shapes if n.endswith("o_proj.bias")})
    quantized = {weight_name(n) for n in shapes if weight_name(n) != n}
    shapes = {n: shape for n, shape in shapes.items() if weight_name(n) == n}
    shapes |= {n: expected.get(n, ()) for n in quantized}
    problems = []
    if missing := sorted(set(expected) - set(shapes)):
        problems.append(f"missing tensors: {_few(missing)}")
    if unexpected := sorted(set(shapes) - set(expected)):
        problems.append(f"unexpected tensors: {_few(unexpected)}")
    wrong = [f"{n} {tuple(shapes[n])} != {expected[n]}" for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    if wrong:
        problems.append(f"wrong shapes: {_few(wrong)}")
    if problems:
        raise ValueError(f"{source} does not match its config: " + "; ".join(problems))


def _few(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
