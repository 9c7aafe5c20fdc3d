"""Quantized weights on the GPU: kernels checked against their torch twins, then timed.

    PYTHONPATH=. python3 benchmarks/quant_gpu.py --out $OUT [--real .gpu-data/qwen05-layers.pt] \
        [--sections check,sweep,kernels,latency,throughput] [--sweep "1:int8,int4;256:int8"]

1. check: the Triton int8/int4 kernels (GEMV and GEMM shapes), the dense bf16
   GEMV (``DENSE_GEMV`` shapes) and the W8A8 path against ``kernels.torch_quant``
   evaluated in fp32 (W8A8: its fused quantization's codes bit for bit, the
   products against the exact float64 one, with and without an input scale
   and a bias), on random Llama-3-8B-shape matrices and, with ``--real``,
   on real Qwen2.5-Coder-0.5B layers with activations captured from the model
   (``benchmarks/quant_real_layers.py``).
2. sweep: tile configurations per row count and format (``int8``, ``int4``,
   ``w8a8``), the best (summed over the four projections) replacing its
   table's entry for the sections after it.
3. kernels: each Llama-3-8B projection and the LM head at ``--kernel-rows``:
   bf16 cuBLAS (and the Triton bf16 GEMV), the fused kernels, dequantize+cuBLAS,
   tinygemm and W8A8 (the Triton kernels, and the ``torch._int_mm`` path they
   replaced), with the bytes each reads over the measured copy bandwidth.
4. latency / throughput: ``pagellm bench latency`` (batch 1, 128 -> 128) and
   ``pagellm bench throughput`` (256 requests) per format, interleaved in one
   machine session, ratios against bf16; ``w8a8-int-mm``: the ``w8a8`` engine on
   the ``torch._int_mm`` path (``quant_ops.W8A8_FUSED`` off), the before;
   ``int8-torch-dequant``: ``int8`` with its long steps dequantized by the torch
   twin (``quant_ops.TRITON_DEQUANT`` off), the before.
Everything goes into one JSON (``$OUT/quant-gpu.json``); a table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
import torch.nn.functional as F

from bench_run import run_bench, run_section
from pagellm.kernels import quant_ops, torch_quant

LLAMA3_8B = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
             "down_proj": (4096, 14336)}
TOLERANCE = 1e-2           # ||out - ref|| / ||ref||, bf16 activations and outputs
LM_HEAD = {"lm_head": (128256, 4096)}      # int8 under the weight-only formats; timed in each to compare
W8A8_TOLERANCE = 4e-3      # against the exact reference: only the final bf16 rounding differs
TOLERANCES = {"w8a8": W8A8_TOLERANCE, "w8a8 smoothed+bias": W8A8_TOLERANCE,
              "w8a8 codes": 0.0,   # the fused quantization: every code and scale as the torch twin's
              "int8 dequantize": 0.0, "int4 dequantize": 0.0}   # every value as the torch twin's


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def tinygemm_pack(p4: torch.Tensor, s4: torch.Tensor, z4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's int4 codes repacked for torch's tinygemm (``torch._weight_int4pack_mm``): pairs along K,
    the even element in the high nibble, and ``w = (q - 8) * scale + zero`` with ``zero = (8 - z) * scale``."""
    codes = torch_quant.unpack_int4(p4)
    swapped = (codes[:, 0::2] << 4) | codes[:, 1::2]
    scale = s4.float()
    scales_and_zeros = torch.stack([scale, (8 - z4.float()) * scale], -1).transpose(0, 1).contiguous()
    return torch._convert_weight_to_int4pack(swapped, 8), scales_and_zeros.bfloat16()


def check_matrix(name: str, w: torch.Tensor, x: torch.Tensor, w8a8: bool = True) -> list[dict]:
    """All kernels for one weight ``w [N, K]`` and activations ``x [M, K]`` (bf16, CUDA); ``w8a8``: also
    the W8A8 path (``check_w8a8``)."""
    from pagellm.kernels import triton_quant
    rows = []
    q8, s8 = torch_quant.quantize_int8(w)
    ref8 = x.float() @ torch_quant.dequantize_int8(q8, s8, torch.float32).t()
    rows.append({"case": name, "kernel": "int8", "m": x.shape[0],
                 "error": rel_error(triton_quant.int8_matmul(x, q8, s8, None), ref8)})
    if w.shape[1] % 128 == 0:
        p4, s4, z4 = torch_quant.quantize_int4(w, 128)
        ref4 = x.float() @ torch_quant.dequantize_int4(p4, s4, z4, torch.float32).t()
        rows.append({"case": name, "kernel": "int4", "m": x.shape[0],
                     "error": rel_error(triton_quant.int4_matmul(x, p4, s4, z4, None), ref4)})
        if x.shape[0] == 1:     # the GEMV decodes in the activations' dtype: fp16 too
            xh = x.half()
            rows.append({"case": name, "kernel": "int4 fp16", "m": 1, "error": rel_error(
                triton_quant.int4_matmul(xh, p4, s4, z4, None), xh.float() @ torch_quant.dequantize_int4(
                    p4, s4, z4, torch.float32).t())})
        try:
            packed, sz = tinygemm_pack(p4, s4, z4)
            rows.append({"case": name, "kernel": "int4 tinygemm", "m": x.shape[0],
                         "error": rel_error(torch._weight_int4pack_mm(x, packed, 128, sz), ref4)})
        except (RuntimeError, NotImplementedError) as exc:
            rows.append({"case": name, "kernel": "int4 tinygemm", "m": x.shape[0], "error": float("nan"),
                         "unavailable": str(exc)[:200]})
    rows.append(dequantize_row(name, "int8", triton_quant.dequantize(q8, s8, None, x.dtype),
                               torch_quant.dequantize_int8(q8, s8, x.dtype)))
    if w.shape[1] % 128 == 0:
        rows.append(dequantize_row(name, "int4", triton_quant.dequantize(p4, s4, z4, x.dtype),
                                   torch_quant.dequantize_int4(p4, s4, z4, x.dtype)))
    dense = triton_quant.DENSE_GEMV.get(tuple(w.shape))
    if dense is not None and x.shape[0] == 1:
        wb = w.bfloat16()
        rows.append({"case": name, "kernel": "bf16 gemv", "m": 1,
                     "error": rel_error(triton_quant.dense_matmul(x, wb, None, dense), x.float() @ wb.float().t())})
    return rows + check_w8a8(name, x, q8, s8) if w8a8 else rows


def dequantize_row(name: str, fmt: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
    """The long-step dequantization (``triton_quant.dequantize``) against its torch twin: the fraction of
    values that differ (0: bit for bit)."""
    return {"case": name, "kernel": f"{fmt} dequantize", "m": 0, "error": (got != ref).float().mean().item()}


def check_w8a8(name: str, x: torch.Tensor, q8: torch.Tensor, s8: torch.Tensor) -> list[dict]:
    """The engine's W8A8 path (``quant_ops.w8a8_linear``: the Triton kernels on CUDA) against the torch twin's
    exact float64 product, plain and with a SmoothQuant-like input scale and a bias; and the fused
    quantization's codes and scales against ``torch_quant.quantize_per_token`` (the fraction that differ)."""
    from pagellm.kernels import triton_quant
    gen = torch.Generator(device=x.device).manual_seed(x.shape[0])
    input_scale = torch.exp(0.5 * torch.randn(x.shape[1], device=x.device, generator=gen))
    bias = torch.randn(q8.shape[0], device=x.device, generator=gen).bfloat16()
    smoothed = x * input_scale.to(x.dtype)
    q, scale = triton_quant.quantize_per_token(x, input_scale)
    # the twin on the CPU, whose divisions are IEEE's: torch's CUDA division differs in a few codes in 10^5
    # (h200-2026-12-02-quant-w8a8-sweep.json), where the kernel's div_rn matched the CPU twin bit for bit
    q_ref, scale_ref = (part.to(x.device) for part in torch_quant.quantize_per_token(smoothed.cpu()))
    differ = ((q != q_ref).sum() + (scale != scale_ref).sum()).item() / (q.numel() + scale.numel())
    exact = torch_quant.w8a8_linear(x.double(), q8, s8, None)
    exact_smoothed = torch_quant.w8a8_linear(smoothed.double(), q8, s8, None) + bias.double()
    m = x.shape[0]
    return [{"case": name, "kernel": "w8a8 codes", "m": m, "error": differ},
            {"case": name, "kernel": "w8a8", "m": m, "error": rel_error(quant_ops.w8a8_linear(x, q8, s8, None), exact)},
            {"case": name, "kernel": "w8a8 smoothed+bias", "m": m,
             "error": rel_error(quant_ops.w8a8_linear(x, q8, s8, bias, input_scale), exact_smoothed)}]


def section_check(args) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in LLAMA3_8B.items():
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        for m in (int(m) for m in args.check_rows.split(",")):
            rows += check_matrix(f"random {name}", w, torch.randn(m, k, device="cuda", generator=gen,
                                                                    dtype=torch.bfloat16), m <= args.w8a8_rows)
    if args.real:
        data = torch.load(args.real)
        for name, item in data["layers"].items():
            w, x = item["weight"].cuda().float(), item["inputs"].cuda().bfloat16()
            for m in (1, 16, x.shape[0]):
                rows += check_matrix(f"real {name}", w, x[:m], m <= args.w8a8_rows)
    for r in rows:
        r["ok"] = r["error"] <= TOLERANCES.get(r["kernel"], TOLERANCE)
    return rows


def section_kernels(args) -> list[dict]:
    import triton.testing

    from pagellm.bench.stats import measure_copy_bandwidth
    from pagellm.kernels import triton_quant
    copy_bw = measure_copy_bandwidth(torch.device("cuda"))["bandwidth"]
    rows = []
    for name, (n, k) in (LLAMA3_8B | LM_HEAD).items():
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        q8, s8 = torch_quant.quantize_int8(w)
        p4, s4, z4 = torch_quant.quantize_int4(w, 128)
        for m in (int(m) for m in args.kernel_rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            variants = {
                "bf16 cuBLAS": (lambda: F.linear(x, w), n * k * 2),
                "int8 triton": (lambda: triton_quant.int8_matmul(x, q8, s8, None), n * k + n * 4),
                "int4 triton": (lambda: triton_quant.int4_matmul(x, p4, s4, z4, None), n * k // 2 + n * k // 128 * 3),
                "int8 dequant+cuBLAS": (lambda: torch_quant.int8_linear(x, q8, s8, None), n * k + n * 4),
                "int4 dequant+cuBLAS": (lambda: torch_quant.int4_linear(x, p4, s4, z4, None),
                                        n * k // 2 + n * k // 128 * 3),
                "w8a8 triton": (lambda: quant_ops.w8a8_linear(x, q8, s8, None), n * k + n * 4),
                "w8a8 _int_mm (before)": (lambda: quant_ops.int_mm_w8a8_linear(x, q8, s8, None), n * k + n * 4),
            }
            dense = triton_quant.DENSE_GEMV.get((n, k))
            if dense is not None and m == 1:
                variants["bf16 triton GEMV"] = (lambda: triton_quant.dense_matmul(x, w, None, dense), n * k * 2)
            try:
                packed, sz = tinygemm_pack(p4, s4, z4)
                variants["int4 tinygemm"] = (lambda: torch._weight_int4pack_mm(x, packed, 128, sz),
                                             n * k // 2 + n * k // 128 * 4)
            except (RuntimeError, NotImplementedError):
                pass
            for variant, (fn, weight_bytes) in variants.items():
                ms = _graph_ms(fn)
                rows.append({"layer": name, "m": m, "variant": variant, "ms": ms,
                             "weight_GB_per_s": weight_bytes / ms / 1e6,
                             "fraction_of_copy_bw": weight_bytes / (ms / 1e3) / copy_bw,
                             "TFLOP_per_s": 2 * m * n * k / ms / 1e9})
    return rows


def _graph_ms(fn) -> float:
    """Median time of ``fn`` replayed as a CUDA graph, as the engine's decode steps run: no launch
    overhead, which at these sizes would otherwise be most of what is measured."""
    import triton.testing
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20)


# One-row tiles (block_n, block_k, warps) tried per format: the previous best and tiles giving each thread
# 2-8 output rows (a thread's x values then serve more codes). SASS instructions a code in the loop bodies
# compiled for sm_90: int8 3.9-4.9; int4 2.4-2.8 (two codes an instruction in bf16x2; 3.9-4.8 before).
GEMV_TILES = {"int8": ((4, 1024, 4), (8, 1024, 4), (8, 512, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4),
                       (32, 512, 8), (16, 256, 2)),
              "int4": ((16, 1024, 8), (32, 512, 4), (32, 1024, 8), (64, 256, 4), (64, 512, 8), (128, 256, 8))}


# W8A8 GEMM tiles (block_m, block_n, block_k, warps, stages, programs per SM) tried above 16 rows: 64- and 128-row
# tiles (one or two Hopper warpgroups: 128 rows read each weight tile from L2 half as often), int8 K tiles of
# 64-256; split K where o/down (N = 4096) leave SMs idle.
W8A8_TILES = ((64, 128, 128, 4, 4, 1), (64, 128, 128, 4, 4, 2), (64, 64, 128, 4, 4, 1), (64, 256, 128, 8, 3, 1),
              (64, 128, 256, 4, 3, 1), (128, 128, 128, 8, 3, 1), (128, 128, 128, 8, 3, 2), (128, 128, 64, 4, 4, 1),
              (128, 256, 128, 8, 3, 1), (128, 256, 128, 8, 3, 2), (128, 256, 64, 8, 4, 1))


def sweep_configs(m: int, fmt: str):
    """The tile grid tried at ``m`` rows: ``GEMV_TILES`` at one row (split K up to ~4 programs per SM where
    the tile leaves fewer than two per SM on a 4096-row matrix), SMALL shapes up to 16 rows (W8A8 at one
    row too: it has no GEMV), GEMM tiles above."""
    import itertools

    from pagellm.kernels.triton_quant import MatmulConfig
    if m > 16 and fmt == "w8a8":
        for tile in W8A8_TILES:
            yield MatmulConfig(*tile)
    elif m == 1 and fmt in GEMV_TILES:
        for block_n, block_k, warps in GEMV_TILES[fmt]:
            for ppsm in ((1, 4) if 4096 // block_n < 264 else (1,)):
                yield MatmulConfig(1, block_n, block_k, warps, 3, ppsm)
    elif m <= 16:
        for block_n, block_k, warps, ppsm in itertools.product((32, 64, 128), (128, 256, 512), (4, 8), (1, 2, 8)):
            yield MatmulConfig(16, block_n, block_k, warps, 3, ppsm)
    else:
        for block_m, block_n, block_k, warps, stages in ((128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
                                                         (128, 256, 64, 8, 3)):
            yield MatmulConfig(block_m, block_n, block_k, warps, stages, 1)


def section_sweep(args) -> list[dict]:
    """Tile configurations of the fused kernels (``--sweep``: rows and formats), each checked against the reference
    and timed on every Llama-3-8B projection (a decode step runs them all, so the sum decides). The best
    tiles at each row count replace their table's entry (``triton_quant.TABLES``, by ``table_for``) in the
    latency, throughput and kernels sections that follow."""
    from pagellm.kernels import triton_quant
    gen = torch.Generator(device="cuda").manual_seed(1)
    mats = {}
    for name, (n, k) in (LLAMA3_8B | LM_HEAD).items():    # the LM head: int8 in every weight-only format
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        mats[name] = (w, torch_quant.quantize_int8(w), torch_quant.quantize_int4(w, 128) if name in LLAMA3_8B else None)
    rows = []
    plan = {int(m): fmts.split(",") for m, fmts in (part.split(":") for part in args.sweep.split(";"))}
    sweep_rows = list(plan)
    for m, fmts in plan.items():
        for fmt in fmts:
            for config in sweep_configs(m, fmt):
                row = {"fmt": fmt, "m": m, "config": config.__dict__, "ms": {}, "error": 0.0}
                try:
                    for name, (w, (q8, s8), int4) in mats.items():
                        if (int4 is None and fmt == "int4") or (name in LM_HEAD and (m > 1 or fmt == "w8a8")):
                            continue
                        x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16, generator=gen)
                        if fmt == "int8":
                            fn = lambda: triton_quant.int8_matmul(x, q8, s8, None, config)
                            ref = x.float() @ torch_quant.dequantize_int8(q8, s8, torch.float32).t()
                        elif fmt == "w8a8":
                            fn = lambda: triton_quant.w8a8_matmul(x, q8, s8, None, None, config)
                            ref = torch_quant.w8a8_linear(x.double(), q8, s8, None)
                        else:
                            p4, s4, z4 = int4
                            fn = lambda: triton_quant.int4_matmul(x, p4, s4, z4, None, config)
                            ref = x.float() @ torch_quant.dequantize_int4(p4, s4, z4, torch.float32).t()
                        row["error"] = max(row["error"], rel_error(fn(), ref))
                        row["ms"][name] = _graph_ms(fn)
                    row["total_ms"] = sum(row["ms"][name] for name in LLAMA3_8B)
                except Exception as exc:
                    row["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
    bf16 = {}
    for m in sweep_rows:
        total = 0.0
        for name in LLAMA3_8B:
            w = mats[name][0]
            wb, x = w.bfloat16(), torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            total += _graph_ms(lambda: F.linear(x, wb))
        bf16[m] = total
    for row in rows:
        row["bf16_total_ms"] = bf16[row["m"]]
    for m in sweep_rows:
        for fmt in plan[m]:
            table = triton_quant.table_for(fmt, m)
            ok = [r for r in rows if r["fmt"] == fmt and r["m"] == m and "total_ms" in r and r["error"] <= TOLERANCE]
            if ok:    # for the bench subprocesses, and for the kernels section in this process
                best = min(ok, key=lambda r: r["total_ms"])["config"]
                args.override.setdefault(table, {})[fmt] = best
                getattr(triton_quant, table)[fmt] = triton_quant.MatmulConfig(**best)
            if ok and table == "GEMV":     # and each shape's own best
                for name in ok[0]["ms"]:
                    n, k = (LLAMA3_8B | LM_HEAD)[name]
                    best = min(ok, key=lambda r: r["ms"][name])["config"]
                    args.override.setdefault("GEMV_SHAPES", {})[f"{fmt},{n},{k}"] = best
                    triton_quant.GEMV_SHAPES[fmt, n, k] = triton_quant.MatmulConfig(**best)
    return rows


def table_key(table: str, name: str):
    """A tile table's key from the override's JSON-safe name (``GEMV_SHAPES``: "fmt,n,k" -> (fmt, n, k))."""
    if table != "GEMV_SHAPES":
        return name
    fmt, n, k = name.split(",")
    return fmt, int(n), int(k)


# Benchmark formats that are an engine format run with a switch off (the before of a change): (format, setup).
SWITCHED_FORMATS = {"w8a8-int-mm": ("w8a8", "from pagellm.kernels import quant_ops; quant_ops.W8A8_FUSED = False; "),
                    "int8-torch-dequant": ("int8", "from pagellm.kernels import quant_ops; "
                                                   "quant_ops.TRITON_DEQUANT = False; ")}


def bench(kind: str, quantization: str, args, extra: list[str]) -> dict:
    path = os.path.join(args.out, f"{kind}-{quantization}.json")
    engine_format, switch = SWITCHED_FORMATS.get(quantization, (quantization, ""))
    setup = "".join(f"t.{table}[{table_key(table, name)!r}] = t.MatmulConfig(**{config}); "   # the sweep's best
                    for table, configs in args.override.items() for name, config in configs.items())
    setup = ("import sys; from pagellm.kernels import triton_quant as t; from pagellm.cli import main; " + switch
             + setup + "sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", setup, "bench", kind, "llama-3-8b", "--random-weights",
           "--quantization", engine_format, "--json", path, *extra]
    run = run_bench(cmd, path, args.bench_timeout)
    if "error" in run:
        return run
    data = run.pop("data")
    return run | {"results": data.get("results"), "decode_bandwidth": data.get("decode_bandwidth"),
                  "memory": (data.get("runner") or {}).get("memory"), "roofline": data.get("roofline")}


def section_latency(args) -> dict:
    extra = ["--batch-size", "1", "--input-len", "128", "--output-len", "128", "--num-iters", "3",
             "--kv-cache-memory", "8GiB"]    # without a budget the pool takes the rest, and int4's eager
    # prefill (dequantize + cuBLAS) ran out of memory once CUDA graphs had taken more than their reserve
    return {q: bench("latency", q, args, extra) for q in args.latency_formats.split(",")}


def section_throughput(args) -> dict:
    extra = ["--num-prompts", "256", "--input-len", "32-512", "--output-len", "256", "--ignore-eos",
             "--kv-cache-memory", "40GiB"]
    return {q: bench("throughput", q, args, extra) for q in args.throughput_formats.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--real")
    parser.add_argument("--sections", default="check,kernels,latency,throughput")
    parser.add_argument("--latency-formats", default="none,int8,int4,w8a8")
    parser.add_argument("--throughput-formats", default="none,int8,int4")
    parser.add_argument("--sweep", default="1:int8,int4;16:int8,int4", help="rows:formats;rows:formats...")
    parser.add_argument("--check-rows", default="1,5,16,100,512")
    parser.add_argument("--w8a8-rows", type=int, default=512, help="check W8A8 up to this many rows")
    parser.add_argument("--kernel-rows", default="1,16,64,256,2048")
    parser.add_argument("--bench-timeout", type=int, default=240)
    args = parser.parse_args()
    args.override = {}
    os.makedirs(args.out, exist_ok=True)
    import triton
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "PYTHONPATH=. python3 benchmarks/quant_gpu.py " + " ".join(sys.argv[1:])}
    sections = {"check": section_check, "sweep": section_sweep, "kernels": section_kernels,
                "latency": section_latency, "throughput": section_throughput}
    for name in args.sections.split(","):
        if args.override:
            result["override"] = args.override
        run_section(result, name, lambda: sections[name](args), os.path.join(args.out, "quant-gpu.json"))
    summarize(result)


def summarize(result: dict) -> None:
    checks = result.get("check")
    if isinstance(checks, list):
        bad = [r for r in checks if not r["ok"]]
        worst = {}
        for r in checks:
            worst[r["kernel"]] = max(worst.get(r["kernel"], 0), r["error"])
        print(f"check: {len(checks) - len(bad)}/{len(checks)} ok; worst error {worst}")
        for r in bad[:10]:
            print("  FAIL", r)
    sweep = result.get("sweep")
    if isinstance(sweep, list):
        print("\nsweep: best configurations by the sum over the four projections")
        for m in sorted({r["m"] for r in sweep}):
            for fmt in sorted({r["fmt"] for r in sweep}):
                ok = sorted((r for r in sweep if r["m"] == m and r["fmt"] == fmt and "total_ms" in r
                             and r["error"] <= TOLERANCE), key=lambda r: r["total_ms"])
                failed = sum(1 for r in sweep if r["m"] == m and r["fmt"] == fmt and "failed" in r)
                for r in ok[:3]:
                    print(f"  m={m:2} {fmt} {r['total_ms']:.4f} ms (bf16 {r['bf16_total_ms']:.4f}, "
                          f"x{r['bf16_total_ms'] / r['total_ms']:.2f}) {r['config']} "
                          + " ".join(f"{k}={v:.4f}" for k, v in r["ms"].items()))
                print(f"  m={m:2} {fmt}: {failed} configs failed")
    if result.get("override"):
        print(f"tiles used by the latency and throughput runs: {result['override']}")
    kernels = result.get("kernels")
    if isinstance(kernels, list):
        print(f"\n{'layer':13} {'m':>5} {'variant':22} {'ms':>8} {'GB/s':>7} {'of copy':>8} {'TFLOP/s':>8}")
        for r in kernels:
            print(f"{r['layer']:13} {r['m']:5} {r['variant']:22} {r['ms']:8.4f} {r['weight_GB_per_s']:7.0f} "
                  f"{r['fraction_of_copy_bw']:8.1%} {r['TFLOP_per_s']:8.1f}")
    for part, key in (("latency", "decode_tokens_per_s"), ("throughput", "output_tokens_per_s")):
        runs = result.get(part)
        if not isinstance(runs, dict) or "error" in runs:
            print(part, runs)
            continue
        base = (runs.get("none") or {}).get("results", {}) or {}
        print(f"\n{part}: {key}")
        for q, run in runs.items():
            if "error" in run:
                print(f"  {q:11} ERROR {run['error'][-400:]}")
                continue
            value = run["results"][key]
            floor = (run.get("decode_bandwidth") or {}).get("fraction_of_floor")
            ratio = value / base[key] if base.get(key) else float("nan")
            print(f"  {q:11} {value:10.1f}  x{ratio:5.2f} vs bf16  decode at {floor or 0:.1%} of its bandwidth floor")


if __name__ == "__main__":
    main()
