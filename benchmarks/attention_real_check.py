"""The paged attention kernels on real attention inputs (GPU check).

Reads the queries, keys and values three layers of Qwen2.5-Coder-0.5B computed
over 1,024 tokens of code (``benchmarks/attention_real_inputs.py``), writes the
keys and values into a paged cache (blocks shuffled) through each backend's
write kernel, and attends: a prefill of all the tokens in one causal chunk, a
chunk of the last 256 queries over the cached context, and 64 decode queries
at positions spread over the sequence. Each output is compared with exact
float64 attention over the unquantized K/V (the truth) and the Triton kernels'
with the torch reference's on the same cache format (``auto``: bf16 codes;
``int8``, ``fp8``: quantized as the engine writes them, without the key
smoothing the engine folds into the weights, so the error against the truth is
the format's worst case, not the engine's).

    python3 benchmarks/attention_real_check.py .gpu-data/qwen05-attention.pt [--out $OUT/attention-real.json]
    TRITON_INTERPRET=1 python benchmarks/attention_real_check.py FILE --device cpu --backends torch,triton  # CPU

Each kernel's own error is measured against float64 attention over the values
its cache holds (bf16 queries, codes times scales): quantization error is not
theirs. (The two write kernels round a code that falls exactly half-way
differently, Triton away from zero, torch to even; on layer 0, whose queries and
keys are huge, those few ties move the output by a few percent, so comparing one
backend's output with the other's cache truth would blame the attention kernel.) Exit status 1 when a Triton output is further than ``TOLERANCE`` from it
(relative Frobenius error of the whole output).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from pagellm.engine.kv_cache import KVCache, KVCacheSpec
from pagellm.kernels.attention import AttentionMetadata, get_attention_backend
from pagellm.kernels.kv_quant import dequantize, kv_format

BLOCK = 16
TOLERANCE = 2e-2      # triton vs torch on the same cache; bf16 rounding of a 1k-token softmax is ~4e-3


def truth(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float64 attention of query rows at ``positions`` over keys ``0..position`` (GQA by repetition)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q.double(), kk) * q.shape[-1] ** -0.5
    mask = torch.arange(k.shape[0], device=q.device)[None, :] > positions[:, None]
    probs = scores.masked_fill(mask[None], float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, vv)


def cache_values(cache, slots: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V a cache holds for ``slots``, dequantized in float64 (codes times scales)."""
    def read(codes, scales):
        flat = codes.reshape(-1, *codes.shape[2:])[slots]                 # [T, Hkv, D]
        if fmt is None:
            return flat.double()
        return dequantize(flat, scales.transpose(1, 2).reshape(-1, scales.shape[1])[slots], torch.float64)
    return read(cache.k, cache.k_scale), read(cache.v, cache.v_scale)


def metadata(query_lens: list[int], seq_lens: list[int], table: torch.Tensor, device) -> AttentionMetadata:
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return AttentionMetadata(starts, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                             table.expand(len(seq_lens), -1).contiguous(), torch.zeros(0, dtype=torch.int64,
                                                                                       device=device),
                             max(query_lens), max(seq_lens))


def cases(num_tokens: int) -> dict[str, tuple[list[int], list[int], torch.Tensor]]:
    """name -> (query lengths, context lengths, the positions of the query rows)."""
    decode = torch.linspace(32, num_tokens - 1, 64).long()
    return {"prefill": ([num_tokens], [num_tokens], torch.arange(num_tokens)),
            "chunk": ([256], [num_tokens], torch.arange(num_tokens - 256, num_tokens)),
            "decode": ([1] * 64, (decode + 1).tolist(), decode)}


def run(path: str, device: torch.device, backends: tuple[str, ...], layers: set[int] | None = None,
        kv_dtypes: tuple[str, ...] = ("auto", "int8", "fp8")) -> tuple[list[dict], bool]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16   # Triton's CPU interpreter has no bf16
    if device.type == "cpu" and "triton" in backends:
        from pagellm.kernels import triton_attention
        triton_attention._num_sms = lambda index: 8      # the interpreter has no SMs to split by
    data = torch.load(path)
    rows, ok = [], True
    for layer, tensors in data["layers"].items():
        if layers is not None and layer not in layers:
            continue
        q, k, v = (tensors[name].to(device) for name in ("q", "k", "v"))
        num_tokens, num_kv_heads, head_dim = k.shape
        table = torch.randperm(num_tokens // BLOCK + 1, device=device)[None].int()
        slots = (table[0, torch.arange(num_tokens, device=device) // BLOCK].long() * BLOCK
                 + torch.arange(num_tokens, device=device) % BLOCK)
        for kv_dtype in kv_dtypes:
            fmt = kv_format(kv_dtype)
            spec = KVCacheSpec(1, num_kv_heads, head_dim, dtype if fmt is None else fmt.storage, BLOCK,
                               has_null_block=False)
            outputs, stored = {}, {}
            for name in backends:
                backend = get_attention_backend(name, device)
                cache = KVCache(spec, table.shape[1], device).layers[0]
                backend.write_kv(k.to(dtype), v.to(dtype), cache, slots)
                stored[name] = cache_values(cache, slots, fmt)   # exactly: the truth the kernel can reach
                for case, (query_lens, seq_lens, positions) in cases(num_tokens).items():
                    meta = metadata(query_lens, seq_lens, table, device)
                    out = backend.attend(q[positions.to(device)].to(dtype), cache, meta, head_dim ** -0.5, None)
                    outputs[name, case] = out.double()
            for case, (_, _, positions) in cases(num_tokens).items():
                rows_q = q[positions.to(device)].to(dtype)
                exact = truth(q[positions.to(device)], k, v, positions.to(device))
                err = {name: float((outputs[name, case] - exact).norm() / exact.norm()) for name in backends}
                kernel = {}
                for name in backends:
                    reachable = truth(rows_q, *stored[name], positions.to(device))
                    kernel[name] = float((outputs[name, case] - reachable).norm() / reachable.norm())
                ok &= kernel[backends[-1]] <= TOLERANCE
                gap = float((outputs[backends[-1], case] - outputs["torch", case]).norm()
                            / outputs["torch", case].norm())
                rows.append({"layer": layer, "kv_cache_dtype": kv_dtype, "case": case, "torch_vs_truth": err["torch"],
                             "triton_vs_truth": err[backends[-1]], "triton_vs_torch": gap,
                             "torch_vs_cache_truth": kernel["torch"], "triton_vs_cache_truth": kernel[backends[-1]]})
    return rows, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=None, help="default: torch,triton on CUDA, torch on the CPU "
                                                         "(triton there runs under TRITON_INTERPRET=1)")
    parser.add_argument("--layers", help="e.g. 0,23 (default: every captured layer)")
    parser.add_argument("--kv", default="auto,int8,fp8")
    args = parser.parse_args()
    backends = tuple((args.backends or ("torch,triton" if args.device != "cpu" else "torch")).split(","))
    layers = {int(x) for x in args.layers.split(",")} if args.layers else None
    rows, ok = run(args.data, torch.device(args.device), backends, layers, tuple(args.kv.split(",")))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
              "torch": torch.__version__, "data": args.data, "tolerance": TOLERANCE, "all_within": ok, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"\nreal attention inputs ({args.data}); relative error of the whole output")
    print(f"{'layer':>5} {'kv':>5} {'case':>8} {'torch vs f64':>13} {'triton vs f64':>14} {'triton vs torch':>16} "
          f"{'torch vs cache':>15} {'triton vs cache':>16}")
    for r in rows:
        print(f"{r['layer']:>5} {r['kv_cache_dtype']:>5} {r['case']:>8} {r['torch_vs_truth']:>13.2e} "
              f"{r['triton_vs_truth']:>14.2e} {r['triton_vs_torch']:>16.2e} {r['torch_vs_cache_truth']:>15.2e} "
              f"{r['triton_vs_cache_truth']:>16.2e}")
    print("all within tolerance" if ok else f"SOME TRITON OUTPUTS ARE FURTHER THAN {TOLERANCE} FROM THE CACHE'S TRUTH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
