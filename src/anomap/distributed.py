"""Training one run over several processes: ``torchrun ... -m anomap train``.

torchrun starts one process per GPU (or per CPU slot) and sets RANK, WORLD_SIZE
and LOCAL_RANK; anomap reads them, joins the process group (``nccl`` on GPUs,
``gloo`` on CPUs) and trains with DistributedDataParallel. Every rank draws the
same seeded order each epoch and takes its share of every global batch, so the
global batch is the recipe's batch size and the learning rate needs no
scaling. Gradients are averaged across ranks, which over equal shares is the
one-process mean. On GPUs BatchNorm becomes SyncBatchNorm, so its statistics
are the global batch's; PyTorch has no SyncBatchNorm on CPUs, where each
rank's BatchNorm sees its own share (held-out scores then differ from a
one-process run's a little: the test states by how much). Only rank 0 writes
the run folder; held-out scoring and calibration run once, on rank 0, and the
selection decision is broadcast, so every rank keeps the same epoch.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks (one rank: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Distributed:
        """What torchrun set, or one rank when it did not start us."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: torch.device) -> torch.device:
        """Each rank's GPU is its LOCAL_RANK's; CPUs are shared."""
        if self.enabled and requested.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    def start(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            log.info("rank %d of %d (%s)", self.rank, self.world_size, backend)

    def share(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of one global batch of sample indices."""
        return index[self.rank::self.world_size] if self.enabled else index

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (a selection decision, a score)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.broadcast(tensor, src=0)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, step: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel (with SyncBatchNorm on GPUs) around the training step."""
        if not self.enabled:
            return step
        if device.type == "cuda":
            step = torch.nn.SyncBatchNorm.convert_sync_batchnorm(step)
            return torch.nn.parallel.DistributedDataParallel(step, device_ids=[device.index])
        return torch.nn.parallel.DistributedDataParallel(step)


def current() -> Distributed:
    return Distributed.from_environment()
