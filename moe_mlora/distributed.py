"""Where this process stands in a distributed (DDP) run, and the few collectives we need.

Lightning initializes ``torch.distributed`` when a DDP Trainer starts fitting or testing,
and the process group outlives the Trainer, so every later phase (each with its own
Trainer) and the code after training see the same group. Everything here reads the group
lazily, at call time: a batch iterable asks for its rank when it is iterated (after
Lightning has set up the group), never when it is built. In a single process every helper
is a no-op, so the single-process code path is unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn
from torchmetrics.utilities.distributed import gather_all_tensors


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_slot() -> tuple[int, int]:
    """``(rank, world_size)`` in the default process group; ``(0, 1)`` in a single process."""
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rank() -> int:
    """This process's global rank, also before Lightning has initialized the process group.

    Before the first Trainer starts, a DDP child process already knows its rank from the
    environment its launcher gave it (``LOCAL_RANK``, ``RANK``, ``SLURM_PROCID``), which is
    what Lightning's ``rank_zero_only.rank`` holds.
    """
    if _initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    """True on the one process that writes files (results, model, checkpoints) and prints."""
    return global_rank() == 0


def barrier() -> None:
    """Wait until every process gets here (so no rank reads a file before rank 0 wrote it)."""
    if _initialized():
        dist.barrier()


def externally_launched() -> bool:
    """True when a launcher (torchrun, SLURM's srun, a DDP parent) already made the processes.

    Lightning's own DDP launcher re-executes the command for the other ranks only when no
    rank variable is set; these are the variables its cluster environments read.
    """
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def _collective_device(like: torch.Tensor) -> torch.device:
    """The CPU where the backend moves CPU tensors (gloo); the current GPU under NCCL alone."""
    backend = str(dist.get_backend()).lower()
    if "cpu:" in backend or backend in ("gloo", "mpi", "ucc"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 1-D tensor concatenated over all processes in rank order, on the CPU.

    Shards may differ in length (and be empty). With contiguous row ranges per rank, rank
    order is the single process's row order.
    """
    if process_slot()[1] == 1:
        return tensors
    out = []
    for tensor in tensors:
        device = _collective_device(tensor)
        parts = gather_all_tensors(tensor.detach().contiguous().to(device))
        out.append(torch.cat([part.cpu() for part in parts]))
    return tuple(out)


def all_gather_object(value: object) -> list[object]:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    world = process_slot()[1]
    if world == 1:
        return [value]
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes (a new tensor on ``tensor``'s device)."""
    if process_slot()[1] == 1:
        return tensor
    summed = tensor.detach().clone().to(_collective_device(tensor))
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device)


@torch.no_grad()
def average_running_statistics(module: nn.Module) -> None:
    """Average ``module``'s moving statistics (float buffers named ``running_*``) over all
    processes, in place; a no-op in a single process.

    Under DDP each process moves them with its own shard of every batch (STAR's
    partitioned normalisation), and buffer syncs are off (``trainer_strategy``): evaluated
    as they stand, each process would score its shard of the rows with other statistics,
    and the validation WAUC that picks the best epoch would belong to no single model.
    """
    world = process_slot()[1]
    buffers = [
        buffer
        for name, buffer in module.named_buffers()
        if name.rsplit(".", 1)[-1].startswith("running_") and buffer.is_floating_point()
    ]
    if world == 1 or not buffers:
        return
    device = _collective_device(buffers[0])
    flat = torch.cat([buffer.reshape(-1).to(device) for buffer in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for buffer, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(part.view_as(buffer))
