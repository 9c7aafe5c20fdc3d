"""One engine over several processes: tensor x pipeline parallel ranks.

Rank 0 is the engine's process: scheduler, block manager, sequences, and the
``ModelRunner`` of stage 0, tensor rank 0. Every other rank runs
``serve_worker``: it waits on the control group (``distributed.groups``) for
rank 0's commands and runs its own ``ModelRunner`` on them; it never sees a
``Sequence``, only what the step contract (``step.py``) carries:

* ``("start", EngineConfig, max_model_len)``: open the checkpoint, load this
  rank's slices, profile, size the KV pool: ``start_runner``, the calls rank 0
  makes at the same time;
* ``("step", StepInput)``: one step (rank 0's ``ModelRunner.launch`` sends it);
* ``("stop",)``: drop the runner and wait for the next start; ``("exit",)``.

The ranks come from one of two places. One host: ``Workers.spawn`` starts
``world - 1`` processes with torch.multiprocessing (spawn) that rendezvous with
the engine over a local TCP port. A launcher that starts every rank itself
(``torchrun``, several hosts): ``join_launched`` reads ``RANK``/``WORLD_SIZE``
from the environment; rank 0 goes on to build the engine, the others serve.

Failure: a collective whose peer died raises (gloo: the closed socket; NCCL
or a stuck peer: ``distributed_timeout``); rank 0 turns that into
``ParallelFailure``, naming dead processes when it spawned them, which the
engine does not take for one request's fault. A worker whose rank 0 died gets
an error in its wait and exits.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagellm.config import EngineConfig
from pagellm.distributed.groups import CollectiveError, ParallelGroups, close_parallel, init_parallel
from pagellm.engine.model_runner import ModelRunner
from pagellm.engine.step import profile_step_input
from pagellm.quant import (CALIBRATED_FORMATS, check_quantization_fits, keeps_blocks, quantization_policy,
                           resolve_quantization, saved_format)

logger = logging.getLogger("pagellm")


class ParallelFailure(RuntimeError):
    """A rank died or stopped answering: the engine cannot go on."""


def open_model(config: EngineConfig, with_tokenizer: bool = True):
    """(model config, checkpoint or None, weight stream, tokenizer or None) of ``config.model``."""
    if config.random_weights:   # a preset name, config.json, HF folder or GGUF file gives the shapes
        from pagellm.model.builder import random_weights
        from pagellm.model.model_spec import load_model_config
        model_config = load_model_config(config.model)
        return model_config, None, random_weights(model_config, config.torch_dtype, config.torch_device,
                                                  config.seed), None
    from pagellm.model.checkpoint import open_checkpoint
    checkpoint = open_checkpoint(config.model)
    if keeps_blocks(config.quantization, checkpoint):
        checkpoint = checkpoint.sharing_embedding()   # a tied matrix the file holds twice is loaded once
        weights = checkpoint.block_tensors()
    else:   # several ranks: each reads only its slices
        weights = checkpoint.tensor_parts() if config.world_size > 1 else checkpoint.tensors()
    return checkpoint.config, checkpoint, weights, checkpoint.load_tokenizer() if with_tokenizer else None


def start_runner(config: EngineConfig, model_config, checkpoint, weights, max_model_len: int,
                 groups: ParallelGroups | None, draft: ModelRunner | None = None) -> tuple[ModelRunner, str]:
    """(this rank's runner with its KV pool allocated, the weight format it runs); a ``draft`` model's
    weights and its pool of as many blocks are counted in the pool's sizing."""
    quantization = resolve_quantization(config.quantization, checkpoint)
    check_quantization_fits(quantization, model_config, config.torch_device)
    if groups and config.cpu_offload_memory is not None:
        raise ValueError("cpu_offload_memory streams layers on one process; it is not combined with tensor or "
                         "pipeline parallelism")
    if groups and groups.tensor.size > 1 and quantization in CALIBRATED_FORMATS and saved_format(checkpoint) is None:
        raise ValueError(f"quantization {quantization!r} calibrates on one process: write the calibrated checkpoint "
                         f"once with `pagellm quantize MODEL OUT --method {quantization}` and serve OUT with "
                         f"tensor_parallel_size > 1")
    runner = ModelRunner(config, model_config, weights, max_model_len,
                         quantization_policy(quantization, checkpoint, config), groups)
    if groups:
        groups.wait_all()   # profiling runs the model's collectives, under their timeout
    profile = profile_step_input(config.batched_tokens, config.max_num_seqs, max_model_len, config.block_size)
    runner.allocate_kv_cache(*runner.profile_activations(profile), draft)
    return runner, quantization


def serve_worker(groups: ParallelGroups) -> None:
    """A rank other than 0: run rank 0's commands until it says exit (or dies).
    A step that raises on every rank alike (a request's fault) is dropped here
    as rank 0 drops it; a broken collective ends the loop."""
    runner = None
    while True:
        command, *args = groups.broadcast()
        if command == "exit":
            return
        if command == "stop":
            runner = None
        elif command == "start":
            config, max_model_len = args
            config = replace(config, device=str(groups.device))
            model_config, checkpoint, weights, _ = open_model(config, with_tokenizer=False)
            runner, _ = start_runner(config, model_config, checkpoint, weights, max_model_len, groups)
        else:
            try:
                runner.execute(*args)
            except (CollectiveError, dist.DistError):
                raise
            except Exception as exc:
                logger.debug(f"rank {groups.rank}: step failed on every rank alike: {exc}")


@dataclass
class Workers:
    """Rank 0's handle on the other ranks: ``processes`` when it spawned them."""
    groups: ParallelGroups
    processes: list[mp.Process]

    @classmethod
    def connect(cls, config: EngineConfig, max_model_len: int) -> Workers | None:
        """The other ranks, told to start: joined (a launcher already made the
        world) or spawned here; None for one process."""
        if config.world_size == 1:
            return None
        if "RANK" in os.environ:
            workers = cls(_launched_groups(config), [])
        else:
            workers = cls.spawn(config)
        workers.groups.broadcast(("start", config, max_model_len))
        return workers

    @classmethod
    def spawn(cls, config: EngineConfig) -> Workers:
        device_type = config.torch_device.type
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        processes = [context.Process(target=_spawned_worker, daemon=True, name=f"pagellm-rank{rank}",
                                     args=(rank, config, init_method, device_type))
                     for rank in range(1, config.world_size)]
        for process in processes:
            process.start()
        groups = init_parallel(config.tensor_parallel_size, config.pipeline_parallel_size, 0, init_method,
                               device_type, config.distributed_timeout)
        return cls(groups, processes)

    def failure(self, exc: Exception) -> ParallelFailure | None:
        """What ``exc`` (raised by a step) means for the world: a ``ParallelFailure``
        when a rank is gone or a collective broke, None for a request's own fault."""
        dead = [f"{p.name} (exit code {p.exitcode})" for p in self.processes if not p.is_alive()]
        if not dead and not isinstance(exc, (CollectiveError, dist.DistError)):
            return None
        what = f"worker process(es) died: {', '.join(dead)}" if dead else f"a collective failed: {exc}"
        return ParallelFailure(f"the parallel engine ({self.groups.world_size} ranks) cannot go on: {what}")

    def close(self) -> None:
        """Stop the other ranks' runners; spawned workers exit and the world is left."""
        with contextlib.suppress(CollectiveError):   # a rank that died already has nothing to hear
            self.groups.broadcast(("exit",) if self.processes else ("stop",))
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        if self.processes:
            close_parallel()


def join_launched(config: EngineConfig) -> ParallelGroups | None:
    """Under a launcher (``torchrun``: ``RANK`` in the environment), join the
    world; rank 0 returns to build the engine (None when not launched so)."""
    if "RANK" not in os.environ:
        return None
    return _launched_groups(config)


@contextlib.contextmanager
def launched_ranks(config: EngineConfig) -> Iterator[bool]:
    """Wrap a command that builds engines: under a launcher, every rank but 0
    serves inside (and yields False) until rank 0 has left the block (and
    yielded True); without one, just True."""
    groups = join_launched(config)
    if groups is None:
        yield True
        return
    if groups.rank != 0:
        try:
            serve_worker(groups)
        finally:
            close_parallel()
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(CollectiveError):   # a rank that died already has nothing to hear
            groups.broadcast(("exit",))
        close_parallel()


def _launched_groups(config: EngineConfig) -> ParallelGroups:
    global _LAUNCHED
    if _LAUNCHED is None or not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world != config.world_size:
            raise ValueError(f"the launcher started {world} processes, but tensor_parallel_size x "
                             f"pipeline_parallel_size is {config.world_size}")
        _LAUNCHED = init_parallel(config.tensor_parallel_size, config.pipeline_parallel_size,
                                  int(os.environ["RANK"]), "env://", config.torch_device.type,
                                  config.distributed_timeout)
    return _LAUNCHED


_LAUNCHED: ParallelGroups | None = None   # this process's world when a launcher made it (one per process)


def _spawned_worker(rank: int, config: EngineConfig, init_method: str, device_type: str) -> None:
    if device_type == "cpu":   # the host's cores are shared by the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    groups = init_parallel(config.tensor_parallel_size, config.pipeline_parallel_size, rank, init_method,
                           device_type, config.distributed_timeout)
    try:
        serve_worker(groups)
    finally:
        close_parallel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
