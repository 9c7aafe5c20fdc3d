"""Real attention inputs for the GPU kernel checks: the rotated queries and the
keys and values that three layers of Qwen2.5-Coder-0.5B write into the cache
over a long stretch of code, captured on the CPU (the GPU machines have no
model files) and small enough to travel with one device call. Random data makes
near-uniform attention; a trained model's has peaked heads, large key channels
(the reason for key smoothing) and attention sinks, which is where a quantized
cache or a kernel's masking goes wrong.

    python benchmarks/attention_real_inputs.py .gpu-data/qwen05-attention.pt [--tokens 1024]

The file holds, per captured layer, ``q [T, 14, 64]``, ``k, v [T, 2, 64]``
(float32, rotary applied; key smoothing off, as the model computes them),
for one sequence of T tokens of tests/data/textwrap.py.txt.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pagellm import LLM, SamplingParams
from pagellm.model.checkpoint import open_checkpoint

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "textwrap.py.txt"
LAYERS = (0, 11, 23)


def capture(model: str, num_tokens: int) -> dict[int, dict[str, torch.Tensor]]:
    ids = open_checkpoint(model).load_tokenizer()(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    llm = LLM(model, dtype="float32", device="cpu", attention_backend="torch", max_model_len=num_tokens + 16,
              num_kv_blocks=num_tokens // 16 + 4, max_num_batched_tokens=num_tokens)
    backend = llm.engine.runner.backend
    calls: list[dict[str, torch.Tensor]] = []
    write_kv, attend = backend.write_kv, backend.attend

    def recording_write(k, v, cache, slot_mapping):
        calls.append({"k": k.detach().clone(), "v": v.detach().clone()})
        return write_kv(k, v, cache, slot_mapping)

    def recording_attend(q, cache, meta, scale, window):
        calls[-1]["q"] = q.detach().clone()
        return attend(q, cache, meta, scale, window)

    backend.write_kv, backend.attend = recording_write, recording_attend
    llm.generate([ids[:num_tokens]], SamplingParams(max_tokens=1), use_tqdm=False)
    num_layers = len(calls)
    return {layer: calls[layer] for layer in LAYERS if layer < num_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    layers = capture(args.model, args.tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": args.model, "layers": layers}, args.out)
    size = sum(t.numel() * t.element_size() for v in layers.values() for t in v.values())
    print(args.out, {layer: tuple(t["q"].shape) for layer, t in layers.items()}, f"{size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
