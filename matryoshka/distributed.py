"""Data-parallel training over ``torch.distributed``: the ranks of a run and the few collectives the
trainer and the SAE need to behave exactly like one process with the whole batch.

Launch with ``torchrun --nproc-per-node N ...`` and call :func:`init_from_env` (the CLI does): it
joins the process group torchrun describes in the environment (NCCL when CUDA is available, else
gloo).  :func:`matryoshka.train.train` then picks the group up by itself, see :meth:`Ranks.current`.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Ranks", "data_parallel", "init_from_env"]


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``
    ...) unless one is already initialised; True when this process is part of a multi-rank run.

    Backend: NCCL when CUDA is available (each rank then uses ``cuda:LOCAL_RANK``), else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return True


def _has_forward_sync_buffers() -> bool:
    return "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


def data_parallel(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` in DDP (gradients averaged over the ranks during backward), with rank 0's parameters
    and buffers copied to every rank once, here, and never at a forward.

    torch 2.13 says so with ``forward_sync_buffers=False``.  Older torch (the H200 image has 2.11)
    lacks that argument, and its ``broadcast_buffers=False`` skips the buffers at construction too,
    so they are broadcast from rank 0 here first.

    Drop the returned model before ``dist.destroy_process_group()`` (:func:`matryoshka.train.train`
    does: the model lives only while it trains, and is gone before an error it raises reaches the
    caller).  A DDP model that outlives the group is its last
    owner, and freeing it then runs gloo's destructor with the GIL held: that joins a worker thread
    which may still need the GIL to free its last collective, and both wait forever.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    if _has_forward_sync_buffers():
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


class Ranks:
    """The ranks of a data-parallel run (the default process group) and its collectives.

    Every collective must be called by all ranks in the same order; the trainer and the SAE call
    them at the same points of every step, so they do.
    """

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    @staticmethod
    def current() -> Ranks | None:
        """The initialised default process group if it spans more than one rank, else ``None``
        (a single process: no collective at all)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return Ranks()
        return None

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` rows (equal contiguous shares)."""
        if batch_size % self.size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the world size {self.size}")
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; every rank receives the same bits."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of ``tensor`` (a new tensor; per-rank means of equal shards
        average to the mean over the whole batch)."""
        return self.sum_(tensor.clone()) / self.size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all) concatenated along dimension 0, rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)
