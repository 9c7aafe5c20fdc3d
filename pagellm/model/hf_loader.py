"""Hugging Face checkpoint folders: config.json + safetensors (single file or sharded).

Only safetensors are read (never pickled `.bin` files); each shard is opened lazily with
`safetensors.safe_open`, so tensors stream one at a time instead of the whole state dict
being held in memory. ``HFWeights.slices`` streams them unread (``LazySlice``): a
tensor-parallel rank narrows each to its part and reads only that.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pagellm.model.config import ModelConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

# Buffers some checkpoints carry that are not weights (rotary tables are recomputed).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config_dict(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {folder} is not a Hugging Face model folder")
    return json.loads(config_file.read_text())


def find_weight_map(folder: Path) -> dict[str, str]:
    """`{tensor name: shard file name}` from the index, or from the single safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return weight_map
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {', '.join(others)}; only safetensors are supported)" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}{hint}")


@dataclass(frozen=True)
class LazySlice:
    """A checkpoint tensor not read yet: ``narrow`` reads nothing, ``read`` only
    the part kept (``safe_open(...).get_slice``)."""
    source: Any = field(repr=False)   # safetensors' slice handle
    shape: tuple[int, ...]
    index: tuple[slice, ...] = ()

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> LazySlice:
        index = [*self.index, *[slice(0, n) for n in self.shape[len(self.index):]]]
        base = index[dim].start
        index[dim] = slice(base + start, base + start + length)
        shape = list(self.shape)
        shape[dim] = length
        return LazySlice(self.source, tuple(shape), tuple(index))

    def read(self) -> torch.Tensor:
        return self.source[self.index] if self.index else self.source[:]


@dataclass
class HFWeights:
    """The weights and tokenizer of one HF folder; `names` is the filtered, ordered tensor list."""

    folder: Path
    config_dict: dict[str, Any]
    weight_map: dict[str, str] = field(repr=False)
    names: list[str] = field(repr=False)

    @classmethod
    def open(cls, folder: Path) -> "HFWeights":
        config_dict = read_config_dict(folder)
        tie_word_embeddings = bool(config_dict.get("tie_word_embeddings", False))
        weight_map = find_weight_map(folder)
        names = [n for n in weight_map if not n.endswith(_SKIPPED_SUFFIXES)]
        if tie_word_embeddings and "lm_head.weight" in names:
            names.remove("lm_head.weight")  # some savers write the tied copy too
        # Shard by shard, so each file is opened once while streaming.
        names.sort(key=lambda n: (weight_map[n], _natural_key(n)))
        return cls(folder, config_dict, weight_map, names)

    def tensor_names(self) -> list[str]:
        return list(self.names)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for file in dict.fromkeys(self.weight_map[n] for n in self.names):
            with safe_open(self.folder / file, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return {n: shapes[n] for n in self.names}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"no tensor {name!r} in {self.folder}")
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, handle in self._handles():
            tensor = handle.get_tensor(name)
            yield name, tensor if dtype is None else tensor.to(dtype)

    def slices(self) -> Iterator[tuple[str, LazySlice]]:
        """(name, unread tensor) pairs, in the order of ``tensors``."""
        for name, handle in self._handles():
            part = handle.get_slice(name)
            yield name, LazySlice(part, tuple(part.get_shape()))

    def _handles(self) -> Iterator[tuple[str, Any]]:
        """Each tensor name with its open shard file, each file opened once."""
        current_file, handle = None, None
        for name in self.names:
            if self.weight_map[name] != current_file:
                current_file = self.weight_map[name]
                handle = safe_open(self.folder / current_file, framework="pt")
            yield name, handle

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if not any((self.folder / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"no tokenizer in {self.folder} (looked for {', '.join(TOKENIZER_FILES)})")
        tokenizer = AutoTokenizer.from_pretrained(self.folder, use_fast=True)
        if not getattr(tokenizer, "chat_template", None):
            log.warning("tokenizer in %s has no chat template", self.folder)
        return tokenizer


def load_hf_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_hf_dict(read_config_dict(folder), name=folder.name)


def _natural_key(name: str) -> list[Any]:
    """Sort `layers.10` after `layers.9`."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]
