"""Cost of the CPU matmuls by row count, against one row: what a speculative
verification of k+1 rows (or a draft's catch-up) pays per layer. Kernels:
torch's packed int8/int4 matmuls (the ``gguf`` CPU layouts, bf16 activations),
and for fp32 ``F.linear`` (MKL's sgemm) against ``kernels.cpu_linear`` (the
model's fp32 path: oneDNN).

    python benchmarks/cpu_packed_rows.py --threads 1 --out benchmarks/results/cpu-2026-12-02-packed-rows.json
    python benchmarks/cpu_packed_rows.py --threads 1 --kernels fp32-F.linear,fp32-oneDNN --rows 1,2,3,4,5,9,128 \
        --out benchmarks/results/cpu-2026-12-02-fp32-rows.json

Shapes of the Qwen2.5-Coder-1.5B (its linears and LM head) and 0.5B (gate|up, LM head);
random codes (speed does not depend on the values). Row counts are timed
interleaved, call by call, so the machine's load hits all alike; medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pagellm.kernels import cpu_linear

SHAPES = {"1.5b q|k|v": (2048, 1536), "1.5b o": (1536, 1536), "1.5b gate|up": (17920, 1536),
          "1.5b down": (1536, 8960), "1.5b lm_head": (151936, 1536),
          "0.5b gate|up": (9728, 896), "0.5b lm_head": (151936, 896)}


KERNELS = ("int8", "int4", "fp32-F.linear", "fp32-oneDNN")


def kernel(name: str, n: int, k: int):
    """(activation dtype, ``x -> x @ W^T``) of a random ``[n, k]`` weight held as ``name`` keeps it."""
    if name == "int8":
        q8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()
        return torch.bfloat16, lambda x: torch._weight_int8pack_mm(x, q8, s8)
    if name == "int4":
        packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        scale_zero = torch.rand(k // 32, n, 2).bfloat16()
        return torch.bfloat16, lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zero)
    weight = torch.randn(n, k)
    if name == "fp32-F.linear":
        return torch.float32, lambda x: F.linear(x, weight)
    return torch.float32, lambda x: cpu_linear.linear(x, weight, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4,5,8")
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--kernels", default="int8,int4", help=f"comma-separated, of {', '.join(KERNELS)}")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for name, (n, k) in SHAPES.items():
        for kernel_name in args.kernels.split(","):
            dtype, run = kernel(kernel_name, n, k)
            xs = {m: torch.randn(m, k, dtype=dtype) for m in rows}
            times: dict[int, list[float]] = {m: [] for m in rows}
            for _ in range(args.iters + 1):
                for m, x in xs.items():
                    start = time.perf_counter()
                    run(x)
                    times[m].append(time.perf_counter() - start)
            med = {m: statistics.median(t[1:]) * 1e3 for m, t in times.items()}
            results.append({"shape": name, "n": n, "k": k, "kernel": kernel_name, "ms": med,
                            "vs_one_row": {m: med[m] / med[rows[0]] for m in rows}})
            print(f"{name:14} {kernel_name}: " + ", ".join(f"{m} rows {med[m]:.2f} ms ({med[m] / med[rows[0]]:.2f}x)"
                                                    for m in rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "benchmark": "cpu_packed_rows", "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/cpu_packed_rows.py " + " ".join(os.sys.argv[1:]),
            "device": f"cpu ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
                      f"{torch.get_num_threads()} threads)", "torch": torch.__version__,
            "loadavg": os.getloadavg(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
