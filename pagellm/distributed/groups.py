"""Who is who in a tensor x pipeline parallel engine, and the traffic between ranks.

``world = tp * pp`` processes; rank ``r`` is pipeline stage ``r // tp`` and
tensor rank ``r % tp`` within it. Rank 0 (stage 0, tensor rank 0) runs the
scheduler. Three kinds of traffic, each on its own group:

* the model's collectives (``TensorGroup``), among the ``tp`` ranks of a
  stage: one all-reduce after attention and one after the MLP, the
  vocab-parallel embedding's all-reduce and the LM head's all-gather. NCCL on
  CUDA, gloo on the CPU, with a timeout: a dead peer raises, never hangs;
* the pipeline: a stage's hidden states and residual go to the same tensor
  rank of the next stage; the last stage's ``StepOutput`` goes back to rank 0;
* control: rank 0 broadcasts every command (``StepInput``s among them) to all
  ranks over a gloo group. A gloo timeout is each process's own: rank 0's is
  the collective timeout (a stuck worker fails the send), the workers' is long,
  since they wait there while the engine is idle; a dead rank 0 closes the
  sockets, which ends that wait. Start-up (joining, loading weights, agreeing
  on the KV pool) runs at each rank's own pace, so it has a group of its own
  with a long timeout.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_IDLE_TIMEOUT = timedelta(days=7)     # workers wait on the control group for the next command
_STARTUP_TIMEOUT = timedelta(hours=1)  # ranks join and load their weights at their own pace


class CollectiveError(RuntimeError):
    """Traffic between ranks failed (a peer died or timed out): the ranks are out of step for good."""


@contextlib.contextmanager
def _traffic(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:   # gloo and NCCL report a dead or stuck peer as a plain RuntimeError
        raise CollectiveError(f"{what}: {exc}") from exc


@dataclass(frozen=True)
class TensorGroup:
    """This rank's place among the ranks that split each layer."""
    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        if self.size > 1:
            with _traffic("all-reduce"):
                dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` side by side along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        with _traffic("all-gather"):
            dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorGroup()


def layer_range(num_layers: int, num_stages: int, stage: int) -> tuple[int, int]:
    """The contiguous layers ``[start, end)`` of pipeline stage ``stage``; the
    first stages take one more when the layers do not split evenly."""
    if num_stages > num_layers:
        raise ValueError(f"pipeline_parallel_size {num_stages} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (stage < extra)


@dataclass
class ParallelGroups:
    """One process's groups; made by ``init_parallel`` on every rank alike."""
    rank: int
    stage: int
    num_stages: int
    tensor: TensorGroup
    control: Any
    pipeline: Any
    startup: Any
    device: torch.device

    @property
    def world_size(self) -> int:
        return self.num_stages * self.tensor.size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    def broadcast(self, message: object = None) -> object:
        """Rank 0's ``message``, on every rank."""
        box = [message]
        with _traffic("broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (the KV pool every rank can hold), once all got there."""
        t = torch.tensor([value], dtype=torch.int64)
        with _traffic("all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.startup)
        return int(t.item())

    def gather(self, value: object) -> list | None:
        """Every rank's ``value`` in rank order, on rank 0 (None elsewhere)."""
        box = [None] * self.world_size if self.rank == 0 else None
        with _traffic("gather"):
            dist.gather_object(value, box, dst=0, group=self.startup)
        return box

    def wait_all(self) -> None:
        """Until every rank got here (loaded its weights, say)."""
        with _traffic("barrier"):
            dist.barrier(group=self.startup)

    def send_activations(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """Hidden states and residual ``[T, hidden]`` to the next stage."""
        with _traffic("pipeline send"):
            dist.send(torch.stack([x, residual]), dst=self.rank + self.tensor.size, group=self.pipeline)

    def recv_activations(self, num_tokens: int, hidden_size: int, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=self.device)
        with _traffic("pipeline receive"):
            dist.recv(buffer, src=self.rank - self.tensor.size, group=self.pipeline)
        return buffer[0], buffer[1]

    def send_output(self, output: object) -> None:
        """The last stage's step result to rank 0 (its tensor rank 0 sends)."""
        with _traffic("pipeline send"):
            dist.send_object_list([output], dst=0, group=self.control)

    def recv_output(self) -> object:
        box = [None]
        with _traffic("pipeline receive"):
            dist.recv_object_list(box, src=(self.num_stages - 1) * self.tensor.size, group=self.control)
        return box[0]


def init_parallel(tensor_parallel_size: int, pipeline_parallel_size: int, rank: int, init_method: str,
                  device_type: str, timeout_s: float) -> ParallelGroups:
    """Join the world (``init_method``: ``tcp://host:port`` or ``env://`` under
    torchrun) and make the groups; every rank calls this with the same sizes."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=tp * pp,
                            timeout=_STARTUP_TIMEOUT)
    stage_groups = [dist.new_group(list(range(s * tp, (s + 1) * tp)), timeout=timeout) for s in range(pp)]
    pipeline = dist.new_group(timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout if rank == 0 else _IDLE_TIMEOUT)
    startup = dist.new_group(backend="gloo", timeout=_STARTUP_TIMEOUT)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return ParallelGroups(rank, rank // tp, pp, TensorGroup(rank % tp, tp, stage_groups[rank // tp]), control,
                          pipeline, startup, device)


def close_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
