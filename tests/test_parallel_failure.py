"""The engine spawns its own tensor-parallel workers (one host): greedy output
matches one process; a stuck worker fails the engine after the collective
timeout and a dead one at once, each with a clear error instead of a hang."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.parallel import ParallelFailure

PROMPT = [5, 9, 12, 40, 7, 33, 2]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
TIMEOUT = 3


def test_a_stuck_then_killed_worker_fails_the_engine_clearly(tiny_llama):
    settings = dict(dtype="float32", block_size=4, num_kv_blocks=16)
    expected = LLM(str(tiny_llama), **settings).generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, distributed_timeout=TIMEOUT, **settings)
    worker, = llm.engine.workers.processes
    try:
        assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == expected
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ParallelFailure, match="a collective failed: .*Timed out"):
            llm.generate([PROMPT], GREEDY)
        assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 5
        worker.kill()
        worker.join()
        start = time.monotonic()
        with pytest.raises(ParallelFailure, match=r"worker process\(es\) died: pagellm-rank1 \(exit code -9\)"):
            llm.generate([PROMPT], GREEDY)
        assert time.monotonic() - start < TIMEOUT   # the closed socket, not a timeout
    finally:
        worker.kill()
        llm.engine.close()
