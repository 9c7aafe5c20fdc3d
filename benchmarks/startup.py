"""Start-up to ready for an 8B model: everything after the weights are in place
(activation profile, KV pool, CUDA graph capture), recorded as JSON.

    PYTHONPATH=. python3 benchmarks/startup.py --json out.json
"""
import argparse
import datetime
import json
import sys
import time

import torch

from pagellm import EngineConfig
from pagellm.engine.llm_engine import LLMEngine


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--json")
    args = parser.parse_args()
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, random_weights=True, dtype="bfloat16"))
    total = time.perf_counter() - start
    graphs = engine.runner.graphs
    record = {"benchmark": "startup", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": f"{args.model} (random weights, bf16, defaults: max_num_seqs 256, block 16)",
              "startup_s": engine.startup_seconds, "total_s": total,
              "cuda_graphs": len(graphs.shapes) if graphs else 0,
              "cuda_graph_capture_s": graphs.capture_seconds if graphs else None,
              "memory": engine.runner.memory.to_dict()}
    print(json.dumps(record, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
