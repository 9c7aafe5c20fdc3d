"""The engine spawns its own tensor-parallel workers (one host): greedy output
matches one process, and a worker that dies brings the engine down with a
clear error instead of a hang."""
from __future__ import annotations

import time

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.parallel import ParallelFailure

PROMPT = [5, 9, 12, 40, 7, 33, 2]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_a_killed_worker_fails_the_engine_clearly(tiny_llama):
    settings = dict(dtype="float32", block_size=4, num_kv_blocks=16, distributed_timeout=20)
    expected = LLM(str(tiny_llama), **settings).generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, **settings)
    try:
        assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == expected
        worker, = llm.engine.workers.processes
        worker.kill()
        worker.join()
        start = time.monotonic()
        with pytest.raises(ParallelFailure, match=r"worker process\(es\) died: pagellm-rank1 \(exit code -9\)"):
            llm.generate([PROMPT], GREEDY)
        assert time.monotonic() - start < 20   # the closed socket, not the timeout
    finally:
        llm.engine.close()
