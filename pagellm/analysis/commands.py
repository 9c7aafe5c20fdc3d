"""``pagellm memory`` and ``pagellm roofline``: argument parsing and rendering.

Quantities (``--gpu-memory 80GiB``, ``--bandwidth 3.35TB/s``, ``--flops
989TFLOP/s``, or plain floats such as ``3.35e12``) are parsed inside the
command so that a bad unit surfaces as a ``ValueError`` the CLI prints as one
clean line. Tables are drawn with ``rich``; ``--json`` prints the report dict
(see ``RooflineReport.to_json`` and ``memory_json``) and nothing else.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from pagellm.analysis.hardware import Hardware, custom_hardware, get_hardware, hardware_names, override
from pagellm.analysis.memory import (DEFAULT_BLOCK_SIZE, DEFAULT_PREFILL_CHUNK, Advice, FitReport,
                                     MemoryBreakdown, MemoryOptions, OffloadAdvice, advise, advise_offload, fit,
                                     memory_breakdown)
from pagellm.analysis.roofline import RooflineReport, StageReport, analyze, model_summary
from pagellm.model.config import ModelConfig
from pagellm.model.model_spec import load_model_config
from pagellm.model.zoo import ZOO
from pagellm.sizing import WEIGHT_FORMATS, Precision, dtype_bits, shard
from pagellm.utils.math import cdiv
from pagellm.utils.units import format_bytes, parse_quantity

DEFAULT_HARDWARE = "H100-SXM"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_memory(subparsers)
    _register_roofline(subparsers)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="config.json, model folder, GGUF file or preset name "
                                 "(llama-2-7b, llama-3-70b, mistral-7b, qwen2.5-7b, ...)")


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-bits", type=int, choices=(16, 8, 4),
                   help="bits of the block linear weights (default 16, or the dtype's)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group size along the input dim, -1 per channel (default 128)")
    p.add_argument("--kv-bits", type=int, choices=(16, 8, 4),
                   help="bits of the KV cache elements (default 16, or the dtype's); 8 and 4 add one fp16 "
                        "scale per token per KV head (8: the engine's --kv-cache-dtype int8/fp8)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (figures are per GPU)")


def _register_memory(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="GPU memory for weights, KV cache, activations; fit questions and advice",
        description="Per-GPU memory of serving MODEL, and with --gpu-memory/--hardware the largest context, "
                    "the largest batch and (--advise) the cheapest quantization reaching a concurrency.")
    _model_arg(p)
    p.add_argument("--batch-size", type=int, default=1, help="sequences held at once (default 1)")
    p.add_argument("--context-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--dtype", default="bf16", help="unquantized dtype: bf16, fp16 or fp32 (default bf16)")
    _quant_args(p)
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB or 8.6e10")
    p.add_argument("--hardware", help=f"GPU preset: {', '.join(hardware_names())}")
    p.add_argument("--advise", action="store_true",
                   help="find the cheapest weight bits / KV bits / max length reaching --target-concurrency")
    p.add_argument("--target-concurrency", type=int, help="users to serve at once (implies --advise)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="KV page size in tokens (default 16)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="tokens per prefill chunk for the activation peak (default 2048)")
    p.add_argument("--workspace", default="1GiB", help="CUDA context + workspaces allowance (default 1GiB)")
    p.add_argument("--cpu-offload-memory", help="decoder-layer weights streamed from host memory, e.g. 30GiB "
                                                "(whole layers; two layer buffers stay on the GPU)")
    p.add_argument("--swap-space", help="host KV pool, e.g. 16GiB")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--measure", action="store_true",
                   help="also build the engine with these settings (random weights for a preset) and show "
                        "its own measured breakdown beside the prediction")
    p.set_defaults(func=run_memory, measure_engine=None)   # pagellm.cli sets the engine's


def _register_roofline(subparsers) -> None:
    p = subparsers.add_parser(
        "roofline", help="per-layer OPs, bytes, intensity, bound and time for prefill and decode",
        description="Roofline analysis of one transformer block (and embedding / LM head) for a prefill of "
                    "--prompt-len tokens and one decode step with that many tokens cached, plus an "
                    "end-to-end estimate for --gen-len generated tokens.")
    _model_arg(p)
    p.add_argument("--hardware", help=f"GPU preset (default {DEFAULT_HARDWARE}): {', '.join(hardware_names())}")
    p.add_argument("--bandwidth", help="memory bandwidth, e.g. 3.35TB/s or 3.35e12 (overrides the preset)")
    p.add_argument("--flops", help="16-bit matmul peak, e.g. 989TFLOP/s (overrides the preset)")
    p.add_argument("--memory", help="GPU memory for the fit check of a custom device, e.g. 80GiB")
    p.add_argument("--link-bandwidth", help="GPU-GPU bandwidth per direction for TP all-reduces, e.g. 450GB/s")
    p.add_argument("--batch-size", type=int, default=1, help="sequences in the batch (default 1)")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    p.add_argument("--gen-len", type=int, default=128, help="generated tokens per sequence (default 128)")
    p.add_argument("--a-bits", type=int, choices=(16, 8), default=16, help="activation bits (default 16)")
    _quant_args(p)
    p.add_argument("--flash-attention", action="store_true", help="fused attention (one row, causal pairs only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="FILE", help="write the roofline chart (PNG, SVG or PDF by suffix)")
    p.set_defaults(func=run_roofline)


# ---------------------------------------------------------------- helpers

def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _quantity(text: str | None, unit: str, flag: str) -> float | None:
    if text is None:
        return None
    try:
        value = parse_quantity(text, unit)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if value <= 0:
        raise ValueError(f"{flag} must be positive, got {text!r}")
    return value


def _workspace(text: str) -> float:
    try:
        value = parse_quantity(text, "B")
    except ValueError as exc:
        raise ValueError(f"--workspace: {exc}") from None
    if value < 0:
        raise ValueError("--workspace cannot be negative")
    return value


def _console():
    from rich.console import Console
    width = max(shutil.get_terminal_size((140, 40)).columns, 110)
    return Console(width=width, highlight=False)


def _gguf_note(config: ModelConfig, w_bits_given: bool) -> list[str]:
    bpw = config.extra.get("gguf_bits_per_weight")
    if bpw is None or w_bits_given or bpw >= 12:
        return []
    bits = 8 if bpw >= 6 else 4
    kind = config.extra.get("gguf_file_type", "?")
    return [f"this GGUF stores its block weights at {bpw:.2f} bits/weight ({kind}); the figures assume "
            f"16-bit weights unless you pass --w-bits (try --w-bits {bits} --group-size 32)"]


def _fmt_bytes(n: float) -> str:
    return format_bytes(n) if n >= 1024 else f"{n:.0f} B"


def _decimal_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _si(n: float, unit: str = "") -> str:
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    if t >= 1e-6:
        return f"{t * 1e6:.1f} µs"
    return f"{t * 1e9:.0f} ns"


# ---------------------------------------------------------------- memory

def memory_json(config: ModelConfig, hardware: Hardware | None, breakdown: MemoryBreakdown,
                fit_report: FitReport | None, advice: Advice | None, notes: list[str],
                offload_advice: OffloadAdvice | None = None) -> dict[str, Any]:
    return {
        "model": model_summary(config),
        "hardware": hardware.to_json() if hardware else None,
        "memory": breakdown.to_json(),
        "fit": fit_report.to_json() if fit_report else None,
        "advice": advice.to_json() if advice else None,
        "offload_advice": offload_advice.to_json() if offload_advice else None,
        "notes": notes,
    }


def run_memory(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "context_len", "tp", "target_concurrency", "prefill_chunk", "block_size"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    config = load_model_config(args.model)
    base = dtype_bits(args.dtype)
    precision = Precision(w_bits=args.w_bits or base, a_bits=base, kv_bits=args.kv_bits or base,
                          group_size=args.group_size, base_bits=base)
    opts = MemoryOptions(tp=args.tp, block_size=args.block_size, prefill_chunk=args.prefill_chunk,
                         workspace_bytes=_workspace(args.workspace))
    hardware = get_hardware(args.hardware) if args.hardware else None
    memory = _quantity(args.gpu_memory, "B", "--gpu-memory") or (hardware.memory_bytes if hardware else None)
    tiers = dict(offload_bytes=_quantity(args.cpu_offload_memory, "B", "--cpu-offload-memory") or 0,
                 swap_bytes=_quantity(args.swap_space, "B", "--swap-space") or 0)
    breakdown = memory_breakdown(config, args.batch_size, args.context_len, precision, opts.tp, opts.block_size,
                                 opts.prefill_chunk, opts.workspace_bytes, **tiers)
    fit_report = fit(config, memory, args.batch_size, args.context_len, precision, opts) if memory else None
    advice = offload_advice = None
    if args.advise or args.target_concurrency:
        if not memory:
            raise ValueError("--advise needs --gpu-memory or --hardware")
        advice = advise(config, memory, args.target_concurrency or args.batch_size, args.context_len,
                        precision, opts)
        offload_advice = advise_offload(config, memory, args.target_concurrency or args.batch_size,
                                        args.context_len, precision, opts)
    notes = _gguf_note(config, args.w_bits is not None)
    if args.context_len > config.max_position_embeddings:
        notes.append(f"context {args.context_len} exceeds the model's {config.max_position_embeddings} positions")
    measured = _measure(args, breakdown) if args.measure else None
    if measured is not None and not measured.fused_attention:   # compare like with like
        breakdown = memory_breakdown(config, args.batch_size, args.context_len, precision, opts.tp, opts.block_size,
                                     opts.prefill_chunk, opts.workspace_bytes, flash_attention=False, **tiers)
        notes.append("the engine's attention backend here (the torch reference) materialises the score "
                     "matrix, so the activations are predicted without FlashAttention")
    if args.json:
        result = memory_json(config, hardware, breakdown, fit_report, advice, notes, offload_advice)
        print(json.dumps(result | ({"measured": measured.to_dict()} if measured else {}), indent=2))
        return 0
    _render_memory(config, hardware, memory, breakdown, fit_report, advice, notes)
    if offload_advice:
        _render_offload_advice(offload_advice)
    if measured:
        _render_measured(breakdown, measured)
    return 0


def _measure(args: argparse.Namespace, b: MemoryBreakdown):
    """The engine's own memory report for the same model, batch, context and dtype, from
    ``args.measure_engine`` (EngineConfig fields -> the engine's ``MemoryReport``), which
    ``pagellm.cli`` hands over: the analyzer never imports the engine."""
    if b.precision.kv_bits < 8:
        raise ValueError("--measure runs the engine with a 16- or 8-bit KV cache: drop --kv-bits 4")
    if args.measure_engine is None:
        raise ValueError("--measure needs the engine (pagellm.engine), which this installation lacks")
    kv_cache_dtype = "int8" if b.precision.kv_bits == 8 else "auto"   # int8 and fp8 take the same bytes
    return args.measure_engine(**_engine_settings(args, b), quantization=_weight_format(b.precision),
                               kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=args.tp)


def _weight_format(p: Precision) -> str:
    """The engine's weight format (``--quantization``) that the precision describes."""
    if p.w_bits >= 16 and p.a_bits >= 16:
        return "none"
    for name, (w_bits, group_size, a_bits) in WEIGHT_FORMATS.items():
        if (p.w_bits, p.group_size, p.a_bits if p.a_bits < 16 else None) == (w_bits, group_size, a_bits):
            return name
    formats = ", ".join(f"--w-bits {w} --group-size {g}" + (f" --a-bits {a}" if a else "")
                        for w, g, a in WEIGHT_FORMATS.values())
    raise ValueError(f"--measure: the engine has no weight format {p.label()}; it has {formats}")


def _engine_settings(args: argparse.Namespace, b: MemoryBreakdown) -> dict[str, Any]:
    """EngineConfig fields matching the prediction: its dtype (the engine takes the same names),
    batch, context and prefill chunk, and a KV pool of exactly the predicted blocks. A model that
    is not on disk (a preset, or a zoo model whose packages are not installed) gets random weights."""
    on_disk = Path(args.model).exists() or (args.model in ZOO and ZOO[args.model].is_installed())
    return dict(model=args.model, dtype=args.dtype.lower(), block_size=args.block_size,
                num_kv_blocks=args.batch_size * cdiv(b.kv_tokens_per_sequence, args.block_size),
                max_model_len=args.context_len, max_num_seqs=args.batch_size,
                max_num_batched_tokens=args.prefill_chunk, random_weights=not on_disk,
                cpu_offload_memory=args.cpu_offload_memory, swap_space=args.swap_space)


def _render_measured(b: MemoryBreakdown, m) -> None:
    from rich.table import Table

    t = Table(title="Predicted vs measured by the engine" + (f" (rank 0 of {b.tp})" if b.tp > 1 else ""))
    for column in ("component", "predicted", "engine", "how the engine got it"):
        t.add_column(column, justify="left" if column in ("component", "how the engine got it") else "right")
    how = "torch.cuda.max_memory_allocated over a full prefill chunk" if m.activation_measured else \
        "estimated (no CUDA allocator to measure on this device)"
    for name, predicted, engine, source in (
            ("weights on the GPU", b.weights_bytes, m.weights_bytes, "bytes of the loaded parameters"
             + (" (two buffers for the streamed layers)" if m.offloaded_layers else "")),
            ("weights on the host", b.host_weights_bytes, m.host_weights_bytes,
             f"{m.offloaded_layers} decoder layers streamed ({m.offload_tier})"),
            ("KV cache per token", b.kv_bytes_per_token, m.kv_bytes_per_token, "size of the allocated pool / tokens"),
            ("KV cache on the GPU", b.kv_bytes, m.kv_cache_bytes, f"{m.num_blocks} blocks x {m.block_size} tokens"),
            ("KV cache on the host", b.host_kv_bytes, m.host_kv_cache_bytes, f"{m.num_host_blocks} blocks"),
            ("activations (peak)", b.activation_bytes, m.activation_bytes, how)):
        t.add_row(name, _fmt_bytes(predicted), _fmt_bytes(engine), source)
    _console().print(t)


def _model_line(config: ModelConfig) -> str:
    window = f", sliding window {config.sliding_window}" if config.sliding_window else ""
    return (f"{config.name or 'model'}: {config.num_parameters / 1e9:.2f} B parameters, "
            f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads / "
            f"{config.num_key_value_heads} KV heads of {config.head_dim}{window}")


def _render_memory(config, hardware, memory, b: MemoryBreakdown, fit_report, advice, notes) -> None:
    from rich.table import Table

    console = _console()
    p = b.precision
    console.print(f"[bold]{_model_line(config)}[/bold]")
    console.print(f"{p.label()}, batch {b.batch_size} x {b.context_len} tokens, TP {b.tp}"
                  + (f", {hardware.name} ({hardware.source})" if hardware else ""))
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    t = Table(title="Memory per GPU" if b.tp > 1 else "Memory")
    t.add_column("component")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    t.add_column("how")
    kv_elem = p.kv_vector_bytes(config.head_dim)
    kvh = shard(config, b.tp).kv_heads
    rows = [
        ("weights", b.weights_bytes, f"block linears {p.w_bits}-bit, embeddings/norms {p.base_bits}-bit"),
        ("KV cache per token", b.kv_bytes_per_token,
         f"2 x {config.num_hidden_layers} layers x {kvh} KV heads x {kv_elem:g} B"),
        ("KV cache", b.kv_bytes, f"{b.batch_size} x {b.kv_tokens_per_sequence} tokens kept"
         + (f" (window {config.sliding_window})" if config.sliding_window else "")),
        ("activations (peak)", b.activation_bytes, "one prefill chunk through a block + logits"),
        ("workspace", b.workspace_bytes, "CUDA context, cuBLAS, allocator slack"),
    ]
    if b.offloaded_layers:
        rows[0] = ("weights", b.weights_bytes, f"on the GPU: {config.num_hidden_layers - b.offloaded_layers} "
                   f"layers + 2 buffers; {p.w_bits}-bit block linears")
    host_rows = [(name, value, how) for name, value, how in (
        ("weights on the host", b.host_weights_bytes, f"{b.offloaded_layers} decoder layers streamed, not in the total"),
        ("KV cache on the host", b.host_kv_bytes, "swap space, not in the total")) if value]
    for name, value, how in rows:
        t.add_row(name, _fmt_bytes(value), _decimal_bytes(value), how)
    t.add_row("[bold]total[/bold]", f"[bold]{_fmt_bytes(b.total_bytes)}[/bold]", _decimal_bytes(b.total_bytes),
              f"x {b.tp} GPUs = {_fmt_bytes(b.total_bytes * b.tp)}" if b.tp > 1 else "")
    for name, value, how in host_rows:
        t.add_row(name, _fmt_bytes(value), _decimal_bytes(value), how)
    console.print(t)
    if fit_report:
        _render_fit(console, fit_report, b)
    if advice:
        _render_advice(console, advice)


def _render_fit(console, f: FitReport, b: MemoryBreakdown) -> None:
    verdict = "[green]fits[/green]" if f.fits else "[red]does not fit[/red]"
    console.print(f"GPU memory {_fmt_bytes(f.memory_bytes)}: batch {b.batch_size} x {b.context_len} tokens "
                  f"{verdict} ({'free' if f.fits else 'short by'} {_fmt_bytes(abs(f.free_bytes))})")
    if f.max_context == 0:
        console.print("[red]not even one token of KV cache fits next to the weights[/red]")
    else:
        mem = f.max_context_by_memory
        by_memory = ("memory alone is no limit (sliding window)" if mem is None
                     else f"memory alone allows {mem} tokens")
        reason = "the model's maximum; " if f.max_context_limited_by == "model" else ""
        console.print(f"largest context at batch {b.batch_size}: {f.max_context} tokens ({reason}{by_memory})")
    console.print(f"largest batch at {b.context_len} tokens: {f.max_batch} sequences")


def _render_advice(console, advice: Advice) -> None:
    from rich.table import Table

    r = advice.recommended
    if r:
        console.print(f"[bold]advice:[/bold] for {advice.target_concurrency} concurrent users use "
                      f"W{r.w_bits} weights, KV{r.kv_bits} cache, max length {r.max_len} "
                      f"(serves {r.concurrency})")
    else:
        best = max(advice.options, key=lambda o: o.concurrency)
        console.print(f"[red]no combination reaches {advice.target_concurrency} users[/red]; at most "
                      f"{best.concurrency} with W{best.w_bits} KV{best.kv_bits} length {best.max_len}: "
                      "add GPUs (--tp) or memory")
    t = Table(title="options, cheapest first (penalty: W8 1, W4 3, KV8 1, KV4 4, halved length 5)")
    for col in ("weights", "KV", "max length", "concurrency", "penalty", "weights/GPU", "KV per token"):
        t.add_column(col, justify="right")
    for o in advice.options[:12]:
        style = "bold green" if o is r else ("" if o.concurrency >= advice.target_concurrency else "dim")
        t.add_row(f"W{o.w_bits}", f"KV{o.kv_bits}", str(o.max_len), str(o.concurrency), str(o.penalty),
                  _fmt_bytes(o.weights_bytes), _fmt_bytes(o.kv_bytes_per_token), style=style)
    console.print(t)


def _render_offload_advice(advice: OffloadAdvice) -> None:
    from rich.table import Table

    console = _console()
    r = advice.recommended
    formats = {16: "none", 8: "int8", 4: "int4"}
    if r is None:
        console.print(f"[red]{advice.target_concurrency} x {advice.context_len} tokens do not fit even with every "
                      "decoder layer streamed from the host[/red]")
    elif r.offloaded_layers:
        console.print(f"[bold]offload:[/bold] --quantization {formats.get(r.w_bits, r.w_bits)} "
                      f"--cpu-offload-memory {_fmt_bytes(r.host_weights_bytes)} ({r.offloaded_layers} layers "
                      f"streamed; each step moves them over the host link)")
    else:
        console.print(f"[bold]offload:[/bold] none needed with --quantization {formats.get(r.w_bits, r.w_bits)}")
    t = Table(title=f"weights streamed from host memory for {advice.target_concurrency} x {advice.context_len} "
                    "tokens")
    for col in ("weights", "layers offloaded", "on the GPU", "on the host"):
        t.add_column(col, justify="right")
    for o in advice.options:
        t.add_row(f"W{o.w_bits}", "-" if o.offloaded_layers is None else str(o.offloaded_layers),
                  _fmt_bytes(o.device_weights_bytes), _fmt_bytes(o.host_weights_bytes),
                  style="bold green" if o is r else "")
    console.print(t)


# ---------------------------------------------------------------- roofline

def _hardware_from_args(args: argparse.Namespace) -> tuple[Hardware, list[str]]:
    bandwidth = _quantity(args.bandwidth, "B/s", "--bandwidth")
    flops = _quantity(args.flops, "FLOP/s", "--flops")
    memory = _quantity(args.memory, "B", "--memory")
    link = _quantity(args.link_bandwidth, "B/s", "--link-bandwidth")
    notes = []
    if args.hardware:
        hw = get_hardware(args.hardware)
    elif bandwidth and flops:
        return custom_hardware(bandwidth, flops, memory or 0.0, link), notes
    elif bandwidth or flops:
        raise ValueError("a custom device needs both --bandwidth and --flops (or pick --hardware)")
    else:
        hw = get_hardware(DEFAULT_HARDWARE)
        notes.append(f"no --hardware given: using {DEFAULT_HARDWARE}")
    return override(hw, bandwidth=bandwidth, flops=flops, memory_bytes=memory, link_bandwidth=link), notes


def run_roofline(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "prompt_len", "gen_len", "tp"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    config = load_model_config(args.model)
    hardware, notes = _hardware_from_args(args)
    report = analyze(config, hardware, batch_size=args.batch_size, prompt_len=args.prompt_len,
                     gen_len=args.gen_len, w_bits=args.w_bits or 16, a_bits=args.a_bits,
                     kv_bits=args.kv_bits or 16,
                     group_size=args.group_size, tp=args.tp, flash_attention=args.flash_attention)
    notes += _gguf_note(config, args.w_bits is not None) + report.notes
    report = replace(report, notes=notes)
    if args.plot:
        from pagellm.analysis.plot import plot_roofline
        plot_roofline(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    _render_roofline(report)
    if args.plot:
        _console().print(f"roofline chart written to {args.plot}")
    return 0


def _render_roofline(report: RooflineReport) -> None:
    console = _console()
    hw = report.hardware
    console.print(f"[bold]{_model_line(report.config)}[/bold]")
    console.print(f"{hw.name} ({hw.source}): {hw.bandwidth / 1e12:.2f} TB/s, "
                  f"{hw.matmul_peak(report.precision.a_bits) / 1e12:.0f} TOP/s at {report.precision.a_bits} bits, "
                  f"ridge {hw.ridge_point(report.precision.a_bits):.0f} OP/B; {report.precision.label()}, "
                  f"TP {report.tp}, FlashAttention {'on' if report.flash_attention else 'off'}")
    for n in report.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    b, s = report.batch_size, report.prompt_len
    _render_stage(console, report.prefill, f"Prefill: batch {b} x {s} tokens")
    _render_stage(console, report.decode, f"Decode: one step, batch {b}, {s} tokens cached")
    e = report.e2e
    m = report.memory
    console.print(f"[bold]end to end[/bold] (prompt {s} + {report.gen_len} generated, batch {b}): "
                  f"TTFT {_time(e.ttft_s)}, TPOT {_time(e.tpot_s)} ({e.per_user_tokens_per_s:.1f} tok/s per user, "
                  f"{e.decode_tokens_per_s:.1f} tok/s decode), total {_time(e.total_time_s)}, "
                  f"{e.tokens_per_s:.1f} generated tok/s overall")
    fits = report.fits
    verdict = "" if fits is None else (" - fits" if fits else " - [red]does not fit[/red]")
    console.print(f"memory per GPU: weights {_fmt_bytes(m.weights_bytes)}, KV {_fmt_bytes(m.kv_bytes)}, "
                  f"activations {_fmt_bytes(m.activation_bytes)}, total {_fmt_bytes(m.total_bytes)}"
                  + (f" of {_fmt_bytes(hw.memory_bytes)}{verdict}" if hw.memory_bytes else ""))


def _render_stage(console, stage: StageReport, title: str) -> None:
    from rich.table import Table

    t = Table(title=f"{title} (per block, x {stage.num_blocks} blocks)", title_justify="left")
    for col, just in (("layer", "left"), ("OPs", "right"), ("weights", "right"), ("activations", "right"),
                      ("KV", "right"), ("OP/B", "right"), ("bound", "left"), ("time", "right"),
                      ("% stage", "right")):
        t.add_column(col, justify=just)
    total = stage.time_s

    def add(r, share_mult: int, style: str = "") -> None:
        inten = "-" if r.intensity is None else f"{r.intensity:.1f}"
        t.add_row(r.name, _si(r.ops), _fmt_bytes(r.cost.weight_bytes), _fmt_bytes(r.cost.act_bytes),
                  _fmt_bytes(r.cost.kv_bytes), inten, r.bound, _time(r.time_s),
                  f"{100 * share_mult * r.time_s / total:.1f}", style=style)

    for r in stage.layers:
        add(r, stage.num_blocks)
    t.add_section()
    for r in stage.outside:
        add(r, 1, "italic")
    t.add_section()
    tot = stage.total_json()
    inten = "-" if tot["intensity"] is None else f"{tot['intensity']:.1f}"
    t.add_row("[bold]model total[/bold]", _si(tot["ops"]), _fmt_bytes(tot["weight_bytes"]),
              _fmt_bytes(tot["act_bytes"]), _fmt_bytes(tot["kv_bytes"]), inten, "",
              f"[bold]{_time(tot['time_s'])}[/bold]", "100.0")
    console.print(t)
