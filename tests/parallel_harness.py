"""Runs engines over several local processes the way a launcher (torchrun) does:
each process gets RANK/WORLD_SIZE/MASTER_* in its environment; rank 0 builds
each job's engine and generates, the other ranks serve it (``launched_ranks``).
One set of processes serves every job of a test module, so the spawn and
import cost is paid once."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp


@dataclass
class Job:
    name: str
    model: str
    prompts: list
    max_tokens: int
    settings: dict = field(default_factory=dict)


def run_jobs(world_size: int, jobs: list[Job], timeout: float = 300) -> dict[str, dict]:
    """Per job, by name, from ``world_size`` processes: ``tokens``, the greedy
    output token ids of each prompt, and ``memory``, each rank's memory report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_rank_main, args=(rank, world_size, port, jobs, results), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    try:
        status, payload = results.get(timeout=timeout)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if status != "ok":
        raise RuntimeError(f"rank 0 failed:\n{payload}")
    return payload


def _rank_main(rank: int, world_size: int, port: int, jobs: list[Job], results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pagellm import LLM, SamplingParams
    from pagellm.config import EngineConfig
    from pagellm.engine.parallel import launched_ranks

    outputs = {}
    try:
        with launched_ranks(EngineConfig(jobs[0].model, **jobs[0].settings)) as driver:
            if driver:
                for job in jobs:
                    llm = LLM(job.model, **job.settings)
                    done = llm.generate(job.prompts, SamplingParams(temperature=0, max_tokens=job.max_tokens,
                                                                    ignore_eos=True), use_tqdm=False)
                    llm.engine.close()
                    outputs[job.name] = {"tokens": [o.outputs[0].token_ids for o in done],
                                         "memory": [m.to_dict() for m in llm.engine.runner.rank_memory]}
    except BaseException:
        import traceback
        if rank == 0:
            results.put(("error", traceback.format_exc()))
        raise
    if rank == 0:
        results.put(("ok", outputs))
