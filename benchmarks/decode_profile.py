"""Where a bs1 decode step goes: graph replay vs host overhead, and the batch-1
matmuls of one layer against the weight bytes they read (H100 figures in
benchmarks/results/h100-2026-11-26-decode-profile.json).

    PYTHONPATH=. python3 benchmarks/decode_profile.py
"""
import time

import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.cuda_graphs import GraphShape


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


llm = LLM("llama-3-8b", random_weights=True, dtype="bfloat16", kv_cache_memory="8GiB", max_num_seqs=8,
          max_model_len=4096)
llm.generate([[1] * 128], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
graphs = llm.engine.runner.graphs
for batch in (1, 8):
    print("replay bs", batch, timed(graphs.graphs[GraphShape(batch, batch, 1)].replay, 100) * 1e3, "ms")
model = llm.engine.runner.model
for name, linear in (("qkv", model.layers[0].self_attn.qkv_proj), ("o", model.layers[0].self_attn.o_proj),
                     ("gate_up", model.layers[0].mlp.gate_up_proj), ("lm_head", model.lm_head)):
    x = torch.randn(1, linear.input_size, device="cuda", dtype=torch.bfloat16)
    seconds = timed(lambda: linear(x), 200)
    print(name, f"{seconds * 1e6:.1f} us", f"{linear.weight.numel() * 2 / seconds / 1e9:.0f} GB/s")
