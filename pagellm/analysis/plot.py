"""Roofline chart of a ``RooflineReport`` (matplotlib, written straight to a file).

Top row, one panel per stage (prefill, decode): attainable performance
against arithmetic intensity, log-log. The solid roof is
``min(peak, bandwidth * intensity)`` for the matmul precision, the dashed one
for the FP32 vector units (element-wise kernels). Each kernel of a block, the
final norm and the LM head is a point at its intensity and at the rate the
model gives it (``OPs / time``), so every point sits on its roof. Kernels
that land on the same spot (all the projections of a decode step do) share
one label.

Bottom row: share of each stage's time per kernel over the whole model, the
question a roofline usually ends in ("where does decode time go?").

Uses the object-oriented API with the Agg canvas, so it never touches the
global pyplot state or needs a display.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from pagellm.analysis.roofline import LayerRow, RooflineReport, StageReport

_CLUSTER_DECADES = 0.12   # points closer than this (in log10 units, both axes) share a label


def _points(stage: StageReport) -> list[LayerRow]:
    return [r for r in stage.layers + stage.outside if r.ops > 0 and r.bytes > 0 and r.time_s > 0]


def _time_shares(stage: StageReport) -> dict[str, float]:
    total = stage.time_s
    shares = {r.name: 100 * stage.num_blocks * r.time_s / total for r in stage.layers}
    shares.update({r.name: 100 * r.time_s / total for r in stage.outside})
    return shares


def _clusters(rows: list[LayerRow]) -> list[list[LayerRow]]:
    """Group points that overlap on a log-log plot (greedy, in order of intensity)."""
    groups: list[list[LayerRow]] = []
    for r in sorted(rows, key=lambda r: r.intensity):
        x, y = math.log10(r.intensity), math.log10(r.ops / r.time_s)
        for g in groups:
            gx, gy = math.log10(g[0].intensity), math.log10(g[0].ops / g[0].time_s)
            if abs(x - gx) < _CLUSTER_DECADES and abs(y - gy) < _CLUSTER_DECADES:
                g.append(r)
                break
        else:
            groups.append([r])
    return groups


def plot_roofline(report: RooflineReport, path: str | Path) -> Path:
    """Draw the report's roofline to ``path`` (format from the suffix: .png, .svg, .pdf)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    stages = {"prefill": report.prefill, "decode": report.decode}
    names = list(dict.fromkeys(r.name for s in stages.values() for r in s.layers + s.outside))
    palette = _colors(len(names))
    color = {n: palette[i] for i, n in enumerate(names)}

    fig = Figure(figsize=(15, 10.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1])
    axes = top.subplots(1, 2, sharey=True)
    all_rows = [r for s in stages.values() for r in _points(s)]
    for ax, (stage_name, stage) in zip(axes, stages.items()):
        _draw_roofline(ax, report, stage, all_rows, color)
        ax.set_title(_stage_title(report, stage_name), fontsize=10)
    axes[0].set_ylabel("attainable performance (OP/s)")
    hw = report.hardware
    top.suptitle(f"{report.config.name or 'model'} on {hw.name} ({hw.source} peaks), {report.precision.label()}, "
                 f"TP={report.tp}, FlashAttention {'on' if report.flash_attention else 'off'}", fontsize=12)

    bars = bottom.subplots()
    _draw_shares(bars, stages, names, color)
    e2e = report.e2e
    bars.set_title(f"time share per kernel (all {report.config.num_hidden_layers} blocks); "
                   f"TTFT {e2e.ttft_s * 1e3:.1f} ms, TPOT {e2e.tpot_s * 1e3:.2f} ms "
                   f"over {report.gen_len} generated tokens", fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def _stage_title(report: RooflineReport, stage_name: str) -> str:
    b, s = report.batch_size, report.prompt_len
    if stage_name == "prefill":
        return f"prefill: batch {b} x {s} tokens, {report.prefill.time_s * 1e3:.2f} ms"
    return f"decode step: batch {b}, {s} tokens cached, {report.decode.time_s * 1e3:.2f} ms"


def _draw_roofline(ax, report: RooflineReport, stage: StageReport, all_rows: list[LayerRow], color) -> None:
    hw = report.hardware
    peak = hw.matmul_peak(report.precision.a_bits)
    ridge = peak / hw.bandwidth
    xs = [r.intensity for r in all_rows]
    x_lo, x_hi = min(xs + [1.0]) / 4, max(xs + [ridge]) * 4
    grid = [x_lo * (x_hi / x_lo) ** (k / 200) for k in range(201)]
    ax.plot(grid, [min(peak, hw.bandwidth * x) for x in grid], color="black", lw=2,
            label=f"{report.precision.a_bits}-bit tensor cores")
    ax.plot(grid, [min(hw.fp32_flops, hw.bandwidth * x) for x in grid], color="gray", lw=1.2, ls="--",
            label="FP32 vector units")
    ax.axvline(ridge, color="black", lw=0.6, ls=":")
    ax.annotate(f"ridge {ridge:.0f} OP/B", (ridge, peak), textcoords="offset points", xytext=(-4, 6),
                ha="right", fontsize=8)
    rows = _points(stage)
    for r in rows:
        ax.scatter(r.intensity, r.ops / r.time_s, s=70, color=color[r.name], edgecolors="black",
                   linewidths=0.6, zorder=3)
    for k, group in enumerate(_clusters(rows)):
        x, y = group[0].intensity, group[0].ops / group[0].time_s
        label = "\n".join(textwrap.wrap(", ".join(r.name for r in group), 34))
        level = k % 3  # stagger neighbouring labels: above, below, further below
        dy = 10 if level == 0 else -(14 + 20 * (level - 1)) - 10 * label.count("\n")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(8, dy), fontsize=7.5,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.7", alpha=0.85), zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    rates = [r.ops / r.time_s for r in all_rows]
    ax.set_ylim(min(rates + [peak]) / 6, peak * 4)
    ax.set_xlabel("arithmetic intensity (OPs / byte)")
    ax.grid(True, which="both", lw=0.3, alpha=0.6)
    ax.legend(loc="upper left", fontsize=8, title="roofs", title_fontsize=8)


def _draw_shares(ax, stages: dict[str, StageReport], names: list[str], color) -> None:
    shares = {s: _time_shares(stage) for s, stage in stages.items()}
    width = 0.4
    xs = range(len(names))
    for k, (stage_name, values) in enumerate(shares.items()):
        offs = [x + (k - 0.5) * width for x in xs]
        vals = [values.get(n, 0.0) for n in names]
        ax.bar(offs, vals, width=width, color=[color[n] for n in names], hatch="" if k == 0 else "//",
               edgecolor="black", linewidth=0.4)
        for x, v in zip(offs, vals):
            if v >= 0.5:
                ax.text(x, v + 0.4, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8.5)
    ax.set_ylabel("% of stage time")
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylim(0, max(max(v.values()) for v in shares.values()) * 1.15)
    ax.grid(True, axis="y", lw=0.3, alpha=0.6)
    ax.legend(handles=[_patch("prefill", ""), _patch("decode", "//")], fontsize=9, loc="upper right")


def _patch(label: str, hatch: str):
    from matplotlib.patches import Patch
    return Patch(facecolor="white", edgecolor="black", hatch=hatch, label=label)


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]
