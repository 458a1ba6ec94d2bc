"""torchrun/DDP: process-group setup once, rank-0 helpers, metric reduction, CPU-capable SyncBN.

cadence never launches processes itself: ``torchrun --nproc_per_node=N -m cadence train ...`` sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, and :func:`init` joins the group (nccl on CUDA, gloo on
the CPU). Without those variables everything runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """What torchrun says about this process (nothing set: one process)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group, once; returns this process's place and device."""
    d = from_env()
    if not d.active:
        return d, device
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_scoped_store(d)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world)
    return d, device


def _restart_scoped_store(d: Dist) -> dist.Store | None:
    """The store for the process group of a (possibly restarted) single-agent torchrun, in a namespace
    of its own per restart; None: let ``init_process_group`` find the store from the environment.

    torchrun's agent hosts the store its workers meet in (``TORCHELASTIC_USE_AGENT_STORE``) and keeps
    the same server, at the same ``MASTER_PORT``, for every restart of ``--max-restarts``; torch's
    ``env://`` rendezvous adds no per-attempt prefix, so a restarted worker can read the address a
    killed worker of the previous attempt left under the same key (gloo's ``default_pg/0//cpu//0/R``)
    and wait on a dead peer in ``ProcessGroupGloo`` creation until the timeout (pytorch#135712).
    ``TORCHELASTIC_RESTART_COUNT`` tells the attempts apart -- but only under one agent: agents on
    several nodes count their restarts apart, and there the environment's own store is used."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE") != "1" \
            or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    from torch.distributed.constants import default_pg_timeout

    server = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), d.world, is_master=False,
                           timeout=default_pg_timeout)
    return dist.PrefixStore(f"cadence/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", server)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``t`` over all ranks (itself when there is one process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all ranks (itself when there is one process)."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(t.detach().float()) / dist.get_world_size()
    return t


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch, on any device (torch's SyncBatchNorm wants a GPU).

    In training under an initialised process group the per-channel mean and variance are computed
    over every rank's images with a differentiable all-reduce (two passes: the mean, then the
    squared deviations from it); otherwise it is plain ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
                self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` becomes :class:`SyncBatchNorm`, keeping its parameters and statistics."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
