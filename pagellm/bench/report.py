"""Output of the offline benchmarks: the roofline prediction beside the
measurement (``pagellm.analysis``), rich tables, the JSON header, target checks."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from pagellm.bench.runner import element_size
from pagellm.config import EngineConfig

TARGETS = {"decode_fraction_of_floor": 0.90, "throughput_vs_hf_generate_batch": 15.0,
           "prefill_fraction_of_matmul": 0.60, "kv_waste_max": 0.04}


def roofline_hardware(args: argparse.Namespace, device_info: dict):
    """The roofline hardware: --hardware, else the preset matching the CUDA device, with --bandwidth/--flops
    overriding; None when nothing describes the device."""
    from pagellm.analysis import custom_hardware, get_hardware, match_device_name
    from pagellm.analysis.hardware import override
    from pagellm.utils.units import parse_quantity
    bw = parse_quantity(args.bandwidth, "B/s") if args.bandwidth else None
    flops = parse_quantity(args.flops, "FLOP/s") if args.flops else None
    hw = None
    if args.hardware:
        hw = get_hardware(args.hardware)
    elif device_info["type"] == "cuda":
        hw = match_device_name(device_info["name"])
    if hw is None:
        return custom_hardware(bw, flops) if bw and flops else None
    return override(hw, bandwidth=bw, flops=flops)


def measured_hardware(hw, peaks: dict):
    from pagellm.analysis import custom_hardware
    from pagellm.analysis.hardware import override
    bw = peaks.get("copy", {}).get("bandwidth")
    mm = (peaks.get("matmul") or {}).get("flops")
    if not bw or not mm:
        return None
    if hw is None:
        return custom_hardware(bw, mm, name="measured")
    return replace(override(hw, bandwidth=bw, flops=mm), name=f"{hw.name} (measured peaks)", source="measured")


def bits_of(engine) -> int:
    return 8 * element_size(engine)


def roofline(engine, hardware_list, batch: int, prompt_len: int, gen_len: int) -> list[dict]:
    from pagellm.analysis import analyze
    from pagellm.sizing import WEIGHT_FORMATS
    bits = bits_of(engine)
    w_bits, group_size, a_bits = WEIGHT_FORMATS.get(engine.quantization, (bits, 128, None))
    out = []
    for hw in hardware_list:
        if hw is None:
            continue
        report = analyze(engine.model_config, hw, batch_size=batch, prompt_len=prompt_len, gen_len=gen_len,
                         w_bits=w_bits, a_bits=a_bits or bits, kv_bits=bits, base_bits=bits, group_size=group_size,
                         flash_attention=True)
        out.append({"hardware": hw.name, "source": hw.source, "bandwidth": hw.bandwidth, "flops": hw.fp16_flops,
                    "report": report})
    return out


def fmt(value, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def print_tables(title: str, rows: list[tuple[str, str]], dists: dict[str, dict], predictions: list[dict],
                 extra: list[tuple[str, str]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=120)
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows + (extra or []):
        table.add_row(name, value)
    console.print(table)
    if dists:
        dt = Table(title="latency distributions (ms)")
        for col in ("", "n", "mean", "p50", "p90", "p99", "max"):
            dt.add_column(col, justify="right")
        for name, d in dists.items():
            dt.add_row(name, str(d["n"]), *(fmt(d[k]) for k in ("mean", "p50", "p90", "p99", "max")))
        console.print(dt)
    if predictions:
        pt = Table(title="roofline prediction vs measurement")
        for col in ("hardware", "metric", "predicted", "measured", "measured / predicted"):
            pt.add_column(col, justify="right")
        for p in predictions:
            pt.add_row(p["hardware"], p["metric"], fmt(p["predicted"], digits=4), fmt(p["measured"], digits=4),
                       fmt(p["ratio"], digits=2))
        console.print(pt)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


def header(args: argparse.Namespace, bench: str, device_info: dict, config: EngineConfig) -> dict:
    skip = {"func"}
    return {"bench": bench, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), "args": {k: v for k, v in vars(args).items() if k not in skip},
            "device": device_info, "engine_config": asdict(config)}


def check(value, target: float, higher_is_better: bool = True) -> dict:
    ok = None if value is None else (value >= target if higher_is_better else value <= target)
    return {"value": value, "target": target, "met": ok}
