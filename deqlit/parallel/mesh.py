"""A data x time process mesh: world = data replicas x time shards.

Rank r sits at (data index r // time, time index r % time): the time shards of one replica are
neighbouring ranks, so on a multi-GPU node they share its fast links, and replicas spread over
nodes. The time group of a replica carries the per-iteration solver traffic (block totals,
residuals, flags); the data group carries only gradient averages and metrics.

Gradient rule for what every time shard holds a copy of (latents x_T, network weights): sum over
the time group (each shard's gradient is partial), average over the data group (the replicas see
different data). An all_reduce over the whole world divided by the number of data replicas does both
at once (`replicated_gradient_scale`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from deqlit.deq.reduce import LOCAL, LocalReducer
from deqlit.parallel.distributed import DistributedReducer


@dataclass
class TimeMesh:
    data: int                         # data replicas
    time: int                         # time shards per replica
    rank: int                         # global rank
    time_group: Optional[dist.ProcessGroup]
    data_group: Optional[dist.ProcessGroup]

    @property
    def data_index(self) -> int:
        return self.rank // self.time

    @property
    def time_index(self) -> int:
        return self.rank % self.time

    def time_reducer(self) -> DistributedReducer:
        """The Reducer that the solvers and the block map use: the shards of this replica."""
        return DistributedReducer(self.time_group)

    def replicated_gradient_scale(self) -> float:
        """Factor on a world-wide gradient all_reduce SUM: 1 / data replicas."""
        return 1.0 / self.data

    def data_slice(self, n: int) -> slice:
        """This replica's contiguous share of n items (the first n mod data replicas get one more)."""
        return share_of(n, self.data, self.data_index)

    def world_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over the whole world, in place and returned (a collective; no gradient)."""
        dist.all_reduce(value)
        return value


@dataclass
class LocalMesh:
    """One process: one data replica of one time shard (the same protocol as TimeMesh)."""
    data: int = 1
    time: int = 1
    rank: int = 0

    def time_reducer(self) -> LocalReducer:
        return LOCAL

    def data_slice(self, n: int) -> slice:
        return slice(0, n)

    def world_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value


def share_of(n: int, parts: int, index: int) -> slice:
    """Part `index` of n items split into `parts` contiguous shares (the first n mod parts get one more)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def build_time_mesh(time_shards: int) -> TimeMesh:
    """Split the initialized world into data x time groups (a collective: every rank calls it)."""
    if not dist.is_initialized():
        raise RuntimeError("build_time_mesh needs torch.distributed initialized (torchrun, or "
                           "init_time_group / the ddp_time strategy)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if time_shards < 1 or world % time_shards:
        raise ValueError(f"time_shards = {time_shards} must divide the world size {world} (world = "
                         f"data replicas x time shards): start a multiple of --parallel.time_shards "
                         f"processes ({'torchrun --nproc_per_node' if dist.is_torchelastic_launched() else '--trainer.devices'} "
                         f"x nodes)")
    data = world // time_shards
    time_group = data_group = None
    timeout = world_timeout()
    # new_group is collective over the whole world: every rank creates every group, in one order.
    for d in range(data):
        group = dist.new_group([d * time_shards + t for t in range(time_shards)], timeout=timeout)
        if rank // time_shards == d:
            time_group = group
    for t in range(time_shards):
        group = dist.new_group([d * time_shards + t for d in range(data)], timeout=timeout)
        if rank % time_shards == t:
            data_group = group
    return TimeMesh(data, time_shards, rank, time_group, data_group)


def group_timeout(group: Optional[dist.ProcessGroup] = None) -> Optional[timedelta]:
    """The timeout of a process group's collectives (None: the default group), or None where
    torch does not expose it."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        device = torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        return pg._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):    # a private API that moved: torch's default
        return None


def world_timeout() -> Optional[timedelta]:
    """The world's timeout (init_process_group's, i.e. parallel.timeout_s), for the mesh's groups:
    new_group would take torch's default (30 minutes) and a silent peer would hold the time group
    that long, while the world's collectives gave up after parallel.timeout_s."""
    return group_timeout(None)
