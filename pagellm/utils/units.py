"""Parse human quantities: '80GiB', '3.35TB/s', '989e12', '1.5 TFLOP/s'."""
from __future__ import annotations

import re

_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15,
           "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kmgtpKMGTP]i?)?\s*([A-Za-z/]*)\s*$")


_SUFFIX_KIND = {"": "", "b": "B", "b/s": "B/s", "bps": "B/s",
                "flop/s": "FLOP/s", "flops": "FLOP/s", "op/s": "FLOP/s", "ops": "FLOP/s"}


def parse_quantity(text: str | float | int, unit: str = "") -> float:
    """Return the value of ``text`` in base units.

    ``unit`` names what the caller expects ("B", "B/s", "FLOP/s"); a suffix that
    names something else is rejected so '80GB/s' cannot pass as a memory size.
    """
    if isinstance(text, (int, float)):
        return float(text)
    m = _PATTERN.match(text)
    if not m:
        raise ValueError(f"cannot parse quantity {text!r}")
    number, prefix, suffix = m.groups()
    scale = _PREFIX[(prefix or "").lower()]
    kind = _SUFFIX_KIND.get(suffix.lower())
    if kind is None:
        raise ValueError(f"unknown unit in {text!r}")
    if unit and suffix and kind != unit:
        raise ValueError(f"{text!r} is not a quantity in {unit}")
    return float(number) * scale


def parse_bytes(text: str | float | int) -> int:
    return int(parse_quantity(text, "B"))


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
