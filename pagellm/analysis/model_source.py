"""Resolve the MODEL argument of the analyzer commands to a ``ModelConfig``.

Accepted, in this order:

1. a Hugging Face ``config.json`` file (any ``.json`` file);
2. a folder holding a ``config.json``, or else exactly one GGUF model (the
   first shard ``*-00001-of-*.gguf`` when split);
3. a GGUF file: only its header is read (``read_gguf_metadata``; the
   tensor data is never touched);
4. a built-in preset name or its Hub id (``pagellm.model.presets``).

GGUF keys used (``{arch}`` is ``general.architecture``): ``{arch}.block_count``,
``.embedding_length``, ``.feed_forward_length``, ``.attention.head_count``,
``.attention.head_count_kv``, ``.attention.key_length`` (head dim),
``.context_length``, ``.rope.freq_base``, ``.attention.layer_norm_rms_epsilon``,
``.attention.sliding_window``, ``.rope.scaling.type``/``.factor``; the
vocabulary from ``{arch}.vocab_size`` or the length of
``tokenizer.ggml.tokens``. Tied embeddings are detected by the absence of an
``output.weight`` tensor and QKV biases by ``blk.0.attn_q.bias``. The
weights' stored width is measured (bytes of the ``blk.*`` matrices over their
element count) and kept in ``config.extra["gguf_bits_per_weight"]`` so the
command can point at the matching ``--w-bits``.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagellm.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from pagellm.model.presets import PRESETS, canonical_preset_name, load_preset


def resolve_model(spec: str) -> ModelConfig:
    """A ModelConfig from a config.json path, a folder, a GGUF file or a preset name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return load_gguf_config(path)
        return _from_json(path)
    if canonical_preset_name(spec) is not None:
        return load_preset(spec)
    raise ValueError(f"model {spec!r} is neither a file, a folder nor a preset; "
                     f"presets: {', '.join(PRESETS)}")


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _from_json(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_json(path)
    except (KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a Hugging Face config.json (missing {exc})") from None
    except ValueError as exc:  # json errors are ValueErrors too
        raise ValueError(f"cannot read {path}: {exc}") from None


def _from_folder(path: Path) -> ModelConfig:
    if (path / "config.json").is_file():
        return _from_json(path / "config.json")
    ggufs = sorted(path.glob("*.gguf"))
    firsts = [p for p in ggufs if "-00001-of-" in p.name]
    if len(ggufs) == 1 or len(firsts) == 1:
        return load_gguf_config((firsts or ggufs)[0])
    if ggufs:
        raise ValueError(f"{path} holds several GGUF files; name one: {', '.join(p.name for p in ggufs)}")
    raise ValueError(f"{path} has neither a config.json nor a .gguf file")


# ---------------------------------------------------------------- GGUF metadata

@dataclass(frozen=True)
class GGUFArray:
    """An array value; ``values`` is None when it was skipped (long arrays such as the vocabulary)."""
    length: int
    values: list | None = None


@dataclass(frozen=True)
class GGUFMetadata:
    fields: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int]]   # name -> (shape, bytes)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays up to this length are decoded, longer ones only counted


class _Scanner:
    """Little-endian GGUF v2/v3 header reader that skips over long arrays without decoding them."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("I"), self.unpack("Q")
            if n <= _KEEP_ARRAY:
                return GGUFArray(n, [self.value(etype) for _ in range(n)])
            if etype in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(n):
                    self.value(etype)
            return GGUFArray(n)
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return math.prod(shape) // block * size


def _scan_gguf(path: Path) -> GGUFMetadata:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        sc = _Scanner(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        sc.pos = 4
        version = sc.unpack("I")
        if version not in (2, 3):
            raise _Unsupported(f"GGUF version {version}")
        n_tensors, n_fields = sc.unpack("Q"), sc.unpack("Q")
        fields = {}
        for _ in range(n_fields):
            key = sc.string()
            fields[key] = sc.value(sc.unpack("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = sc.string()
            shape = tuple(sc.unpack("Q") for _ in range(sc.unpack("I")))
            ggml_type = sc.unpack("I")
            sc.unpack("Q")  # data offset
            tensors[name] = (shape, _tensor_bytes(shape, ggml_type))
    return GGUFMetadata(fields, tensors)


class _Unsupported(Exception):
    pass


def _read_with_gguf_reader(path: Path) -> GGUFMetadata:
    """The gguf package's reader: slow on big vocabularies, but handles every variant."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path, "r")
    fields: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            fields[key] = GGUFArray(len(f.data), f.contents() if len(f.data) <= _KEEP_ARRAY else None)
        else:
            fields[key] = f.contents()
    tensors = {t.name: (tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in reader.tensors}
    return GGUFMetadata(fields, tensors)


def read_gguf_metadata(path: str | Path) -> GGUFMetadata:
    """Key/value metadata and tensor shapes/sizes of a GGUF file; tensor data is never read.

    The header is scanned directly (a fraction of a second even with a
    150k-token vocabulary, which ``GGUFReader`` takes 5-20 s to materialise);
    big-endian or older files fall back to ``gguf.GGUFReader``.
    """
    path = Path(path)
    try:
        return _scan_gguf(path)
    except (_Unsupported, struct.error, KeyError):
        pass
    try:
        return _read_with_gguf_reader(path)
    except Exception as exc:  # the reader raises assorted errors on junk
        raise ValueError(f"cannot read GGUF file {path}: {exc}") from None


def _float32_clean(x: float) -> float:
    """GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07."""
    return float(f"{x:.7g}")


def load_gguf_config(path: str | Path) -> ModelConfig:
    """Build a ModelConfig from a GGUF file's metadata."""
    path = Path(path)
    meta = read_gguf_metadata(path)
    fields, tensors = meta.fields, meta.tensors
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = fields.get(f"{arch}.{name}", default)
        if required and value is None:
            raise ValueError(f"GGUF file {path} lacks {arch}.{name}")
        if isinstance(value, GGUFArray):  # per-layer values (head counts): take the first
            value = value.values[0] if value.values else default
        return value

    heads = key("attention.head_count", required=True)
    hidden = key("embedding_length", required=True)
    vocab = key("vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, GGUFArray):
            raise ValueError(f"GGUF file {path} has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = tokens.length
    hf: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "num_hidden_layers": int(key("block_count", required=True)),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": _float32_clean(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32_clean(key("rope.freq_base", 10000.0)),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
    }
    window = key("attention.sliding_window")
    if window:
        hf["sliding_window"] = int(window)
        hf["use_sliding_window"] = True
    scaling = key("rope.scaling.type")
    if scaling and scaling != "none":
        hf["rope_scaling"] = {"rope_type": scaling, "factor": float(key("rope.scaling.factor", 1.0))}
    name = fields.get("general.name") or path.stem
    config = ModelConfig.from_hf_dict(hf, name=str(name))
    return dataclasses.replace(config, extra={**config.extra, **_gguf_extra(fields, tensors)})


def _gguf_extra(fields: dict[str, Any], tensors: dict[str, tuple[tuple[int, ...], int]]) -> dict[str, Any]:
    extra: dict[str, Any] = {"source": "gguf"}
    file_type = fields.get("general.file_type")
    if file_type is not None:
        from gguf import LlamaFileType
        try:
            extra["gguf_file_type"] = LlamaFileType(file_type).name.replace("MOSTLY_", "")
        except ValueError:
            extra["gguf_file_type"] = str(file_type)
    block = [(shape, size) for name, (shape, size) in tensors.items() if name.startswith("blk.") and len(shape) == 2]
    elements = sum(math.prod(shape) for shape, _ in block)
    if elements:
        extra["gguf_bits_per_weight"] = 8 * sum(size for _, size in block) / elements
    return extra
