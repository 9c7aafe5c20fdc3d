"""Quantized weights on the GPU: kernels checked against their torch twins, then timed.

    PYTHONPATH=. python3 benchmarks/quant_gpu.py --out $OUT [--real .gpu-data/qwen05-layers.pt] \
        [--sections check,kernels,latency,throughput]

1. check: the Triton int8/int4 kernels (GEMV and GEMM shapes) and the W8A8 path
   against ``kernels.torch_quant`` evaluated in fp32, on random Llama-3-8B-shape
   matrices and, with ``--real``, on real Qwen2.5-Coder-0.5B layers with
   activations captured from the model (``benchmarks/quant_real_layers.py``).
   Outputs are poisoned with NaN first so unwritten elements fail.
2. kernels: each Llama-3-8B projection at 1 row (decode) and 2,048 rows
   (prefill): bf16 cuBLAS, the fused kernels, dequantize+cuBLAS and W8A8, with
   the bytes each reads over the measured copy bandwidth.
3. latency / throughput: ``pagellm bench latency`` (batch 1, 128 -> 128) for
   none/int8/int4/w8a8 and ``pagellm bench throughput`` (256 requests) for
   none/int8, interleaved in one machine session, ratios against bf16.
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
W8A8_TOLERANCE = 4e-3      # against the exact int64 reference: only the final bf16 rounding differs


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def tinygemm_pack(p4: torch.Tensor, s4: torch.Tensor, z4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's int4 layout repacked for torch's tinygemm (``torch._weight_int4pack_mm``): the even
    element in the high nibble, and ``w = (q - 8) * scale + zero`` with ``zero = (8 - z) * scale``."""
    swapped = ((p4 & 0xF) << 4) | (p4 >> 4)
    scale = s4.float()
    scales_and_zeros = torch.stack([scale, (8 - z4.float()) * scale], -1).transpose(0, 1).contiguous()
    return torch._convert_weight_to_int4pack(swapped, 8), scales_and_zeros.bfloat16()


def check_matrix(name: str, w: torch.Tensor, x: torch.Tensor) -> list[dict]:
    """All kernels for one weight ``w [N, K]`` and activations ``x [M, K]`` (bf16, CUDA)."""
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
        try:
            packed, sz = tinygemm_pack(p4, s4, z4)
            rows.append({"case": name, "kernel": "int4 tinygemm", "m": x.shape[0],
                         "error": rel_error(torch._weight_int4pack_mm(x, packed, 128, sz), ref4)})
        except (RuntimeError, NotImplementedError) as exc:
            rows.append({"case": name, "kernel": "int4 tinygemm", "m": x.shape[0], "error": float("nan"),
                         "unavailable": str(exc)[:200]})
    refw = torch_quant.w8a8_linear(x.double().cpu(), q8.cpu(), s8.cpu(), None).to(x.device)
    rows.append({"case": name, "kernel": "w8a8", "m": x.shape[0],
                 "error": rel_error(quant_ops.w8a8_linear(x, q8, s8, None), refw)})
    return rows


def section_check(args) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in LLAMA3_8B.items():
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        for m in (1, 5, 16, 100, 512):
            rows += check_matrix(f"random {name}", w, torch.randn(m, k, device="cuda", generator=gen,
                                                                    dtype=torch.bfloat16))
    if args.real:
        data = torch.load(args.real)
        for name, item in data["layers"].items():
            w, x = item["weight"].cuda().float(), item["inputs"].cuda().bfloat16()
            for m in (1, 16, x.shape[0]):
                rows += check_matrix(f"real {name}", w, x[:m])
    for r in rows:
        r["ok"] = r["error"] <= (W8A8_TOLERANCE if r["kernel"] == "w8a8" else TOLERANCE)
    return rows


def section_kernels(args) -> list[dict]:
    import triton.testing

    from pagellm.bench.stats import measure_copy_bandwidth
    from pagellm.kernels import triton_quant
    copy_bw = measure_copy_bandwidth(torch.device("cuda"))["bandwidth"]
    rows = []
    for name, (n, k) in LLAMA3_8B.items():
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
                "w8a8 _int_mm": (lambda: quant_ops.w8a8_linear(x, q8, s8, None), n * k + n * 4),
            }
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


def sweep_configs(m: int):
    """The tile grid tried at ``m`` rows: GEMV/SMALL shapes up to 16 rows, GEMM tiles above."""
    import itertools

    from pagellm.kernels.triton_quant import MatmulConfig
    if m == 1:     # narrow tiles fill the GPU without a split (whose reduction costs a launch)
        for block_n, block_k, warps, ppsm in itertools.product((4, 8, 16, 32), (512, 1024, 2048), (2, 4, 8), (1, 4)):
            yield MatmulConfig(1, block_n, block_k, warps, 3, ppsm)
    elif m <= 16:
        for block_n, block_k, warps, ppsm in itertools.product((32, 64, 128), (128, 256, 512), (4, 8), (1, 2, 8)):
            yield MatmulConfig(16, block_n, block_k, warps, 3, ppsm)
    else:
        for block_m, block_n, block_k, warps, stages in itertools.product((64, 128), (64, 128), (64, 128), (4, 8),
                                                                          (3, 4)):
            yield MatmulConfig(block_m, block_n, block_k, warps, stages, 1)


def section_sweep(args) -> list[dict]:
    """Tile configurations of the fused kernels at ``--sweep-rows`` rows, each checked against the reference
    and timed on every Llama-3-8B projection (a decode step runs them all, so the sum decides). The best
    tiles at each row count replace their table's entry (``triton_quant.GEMV``/``SMALL``/``LARGE``) in the
    latency and throughput runs that follow."""
    from pagellm.kernels import triton_quant
    gen = torch.Generator(device="cuda").manual_seed(1)
    mats = {}
    for name, (n, k) in LLAMA3_8B.items():
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        mats[name] = (w, torch_quant.quantize_int8(w), torch_quant.quantize_int4(w, 128))
    rows = []
    sweep_rows = [int(m) for m in args.sweep_rows.split(",")]
    for m in sweep_rows:
        for fmt in args.sweep_formats.split(","):
            for config in sweep_configs(m):
                row = {"fmt": fmt, "m": m, "config": config.__dict__, "ms": {}, "error": 0.0}
                try:
                    for name, (w, (q8, s8), (p4, s4, z4)) in mats.items():
                        x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16, generator=gen)
                        if fmt == "int8":
                            fn = lambda: triton_quant.int8_matmul(x, q8, s8, None, config)
                            ref = x.float() @ torch_quant.dequantize_int8(q8, s8, torch.float32).t()
                        else:
                            fn = lambda: triton_quant.int4_matmul(x, p4, s4, z4, None, config)
                            ref = x.float() @ torch_quant.dequantize_int4(p4, s4, z4, torch.float32).t()
                        row["error"] = max(row["error"], rel_error(fn(), ref))
                        row["ms"][name] = _graph_ms(fn)
                    row["total_ms"] = sum(row["ms"].values())
                except Exception as exc:
                    row["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
    bf16 = {}
    for m in sweep_rows:
        total = 0.0
        for name, (w, _, _) in mats.items():
            wb, x = w.bfloat16(), torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            total += _graph_ms(lambda: F.linear(x, wb))
        bf16[m] = total
    for row in rows:
        row["bf16_total_ms"] = bf16[row["m"]]
    for m in sweep_rows:
        table = "GEMV" if m == 1 else "SMALL" if m <= 16 else "LARGE"
        for fmt in args.sweep_formats.split(","):
            ok = [r for r in rows if r["fmt"] == fmt and r["m"] == m and "total_ms" in r and r["error"] <= TOLERANCE]
            if ok:
                args.override.setdefault(table, {})[fmt] = min(ok, key=lambda r: r["total_ms"])["config"]
    return rows


def bench(kind: str, quantization: str, args, extra: list[str]) -> dict:
    path = os.path.join(args.out, f"{kind}-{quantization}.json")
    cmd = [sys.executable, "-m", "pagellm.cli", "bench", kind, "llama-3-8b", "--random-weights",
           "--quantization", quantization, "--json", path, *extra]
    if args.override:     # the sweep's best tiles, set in the benchmark's own process
        setup = "import sys; from pagellm.kernels import triton_quant as t; from pagellm.cli import main; " \
                + "".join(f"t.{table}[{fmt!r}] = t.MatmulConfig(**{config}); "
                          for table, configs in args.override.items() for fmt, config in configs.items()) \
                + "sys.exit(main(sys.argv[1:]))"
        cmd[1:3] = ["-c", setup]
    run = run_bench(cmd, path, args.bench_timeout)
    if "error" in run:
        return run
    data = run.pop("data")
    return run | {"results": data.get("results"), "decode_bandwidth": data.get("decode_bandwidth"),
                  "memory": (data.get("runner") or {}).get("memory"), "roofline": data.get("roofline")}


def section_latency(args) -> dict:
    extra = ["--batch-size", "1", "--input-len", "128", "--output-len", "128", "--num-iters", "3"]
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
    parser.add_argument("--sweep-rows", default="1,16")
    parser.add_argument("--kernel-rows", default="1,16,64,256,2048")
    parser.add_argument("--sweep-formats", default="int8,int4")
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
                print(f"  {q:6} ERROR {run['error'][-400:]}")
                continue
            value = run["results"][key]
            floor = (run.get("decode_bandwidth") or {}).get("fraction_of_floor")
            ratio = value / base[key] if base.get(key) else float("nan")
            print(f"  {q:6} {value:10.1f}  x{ratio:5.2f} vs bf16  decode at {floor or 0:.1%} of its bandwidth floor")


if __name__ == "__main__":
    main()
