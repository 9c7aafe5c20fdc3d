"""``load_model_config(spec)``: the ``ModelConfig`` a MODEL argument names,
without reading any weight. The analyzer predicts from it and the engine
builds random-weight models from it, so both see the same model.

Accepted, in this order:

1. a Hugging Face ``config.json`` file (any ``.json`` file): ``ModelConfig.from_json``;
2. a folder holding a ``config.json`` (``hf_loader.load_hf_config``), or else
   exactly one GGUF file;
3. a GGUF file: its metadata goes through the GGUF loader
   (``gguf_loader.config_dict_from_gguf`` on a ``gguf.GGUFReader``, which
   memory-maps the file and never reads the weights);
4. a zoo name whose packages are installed (``pagellm.model.zoo``): the config
   of the GGUF the engine would run, which may differ from the preset of the
   same name (the Qwen2.5-Coder GGUFs carry an untied output projection);
5. a built-in preset name or its Hub id (``pagellm.model.presets.load_preset``).

This module parses no file format itself; the loaders are imported on demand
so that the analyzer does not pull in torch until a checkpoint is named.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pagellm.model.config import ModelConfig
from pagellm.model.presets import PRESETS, canonical_preset_name, load_preset
from pagellm.model.zoo import ZOO, ensure_model_file


def load_model_config(spec: str) -> ModelConfig:
    """A ModelConfig from a config.json path, a folder, a GGUF file, a zoo name or a preset name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return _from_gguf(path)
        return _from_json(path)
    if spec in ZOO and ZOO[spec].is_installed():
        config = _from_gguf(ensure_model_file(spec))
        return replace(config, name=spec)
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
    from pagellm.model.hf_loader import is_hf_folder, load_hf_config

    if is_hf_folder(path):
        try:
            return load_hf_config(path)
        except (KeyError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path / 'config.json'} is not a Hugging Face config.json (missing {exc})") from None
        except ValueError as exc:
            raise ValueError(f"cannot read {path / 'config.json'}: {exc}") from None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf(ggufs[0])
    if ggufs:
        raise ValueError(f"{path} holds several GGUF files; name one: {', '.join(p.name for p in ggufs)}")
    raise ValueError(f"{path} has neither a config.json nor a .gguf file")


def _from_gguf(path: Path) -> ModelConfig:
    """The config the engine would build for this GGUF (same loader, tensors not read)."""
    from gguf import GGUFReader

    from pagellm.model.gguf_loader import config_dict_from_gguf

    try:
        config_dict = config_dict_from_gguf(GGUFReader(path, "r"))
    except Exception as exc:  # the reader raises assorted errors on junk, the loader on missing keys
        raise ValueError(f"cannot read GGUF file {path}: {exc}") from None
    return ModelConfig.from_hf_dict(config_dict, name=config_dict.get("_name_or_path") or path.stem)
