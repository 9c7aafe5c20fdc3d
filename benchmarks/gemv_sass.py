"""SASS instructions a code in the one-row GEMVs' K loops, compiled for sm_90 on any machine (no GPU):

    PYTHONPATH=. python benchmarks/gemv_sass.py [--out results.json]

Each tile of ``quant_gpu.GEMV_TILES`` is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``
(integer arguments and pointers taken as 16-divisible, as at launch), disassembled with the ``nvdisasm``
that Triton ships, and the body of the loop that ends in the longest backward branch is counted: its
instructions over the codes one thread handles per iteration (``block_n * block_k / threads``). The issue
rate bounds a GEMV that is not memory-bound: an H200 issues ~3.3e13 thread-instructions a second and needs
9.6e12 int4 codes a second (4.8e12 int8) to stream at 4.8 TB/s.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_gpu import GEMV_TILES  # noqa: E402

from pagellm.kernels import triton_quant  # noqa: E402

SHAPES = {"M": "i32", "N": "i32", "K": "i32", "k_tiles": "i32", "tiles_per_split": "i32", "stride_xm": "i32",
          "stride_qn": "i32", "stride_ok": "i32", "stride_om": "i32"}
KERNELS = {   # format -> (kernel, its non-shape arguments)
    "int8": (triton_quant._int8_gemv_kernel, {"x_ptr": "*bf16", "q_ptr": "*i32", "scale_ptr": "*fp32",
                                              "bias_ptr": "*bf16", "out_ptr": "*bf16", "exponent": "i32"}),
    "int4": (triton_quant._int4_gemv_kernel, {"x_ptr": "*bf16", "q_ptr": "*i32", "scale_ptr": "*fp16",
                                              "zero_ptr": "*u8", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                                              "stride_sn": "i32", "magic": "i32"}),
}


def compile_gemv(fmt: str, block_n: int, block_k: int, warps: int):
    kernel, arguments = KERNELS[fmt]
    constants = {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": block_k, "HAS_BIAS": False, "SPLIT": False}
    if fmt == "int4":
        constants["GROUP"] = triton_quant.GROUP
    signature = {name: arguments.get(name) or SHAPES.get(name) or "constexpr" for name in kernel.arg_names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name] != "constexpr" and name not in ("M", "exponent", "magic")}
    return triton.compile(ASTSource(kernel, signature, constants, divisible), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": 3})


def loop_body(cubin: bytes) -> list[str]:
    """The instructions of the loop closed by the longest backward branch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    items, labels = [], {}
    for line in text.splitlines():
        if label := re.match(r"\s*\.(L_x_\d+):", line):
            labels[label.group(1)] = len(items)
        elif instruction := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            items.append(instruction.group(1))
    best: list[str] = []
    for end, instruction in enumerate(items):
        target = re.search(r"`\(\.(L_x_\d+)\)", instruction)
        if "BRA" in instruction and target and labels.get(target.group(1), end + 1) <= end:
            best = max(best, items[labels[target.group(1)]:end + 1], key=len)
    return best


def count(fmt: str, block_n: int, block_k: int, warps: int) -> dict:
    body = loop_body(compile_gemv(fmt, block_n, block_k, warps).asm["cubin"])
    codes = block_n * block_k // (32 * warps)
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in body)
    return {"fmt": fmt, "tile": [block_n, block_k, warps], "instructions": len(body), "codes_per_thread": codes,
            "per_code": round(len(body) / codes, 2), "opcodes": dict(opcodes.most_common(8))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [count(fmt, *tile) for fmt, tiles in GEMV_TILES.items() for tile in tiles]
    for r in rows:
        print(f"{r['fmt']} {str(tuple(r['tile'])):16} {r['instructions']:4} instructions / {r['codes_per_thread']:3} "
              f"codes = {r['per_code']:.2f}  {r['opcodes']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "target": "cuda sm_90 (compiled on the CPU)", "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
