"""The one launch path of train.py, invert.py, joint runs and sample.py.

`prepare_launch(cfg)` reads the resolved `trainer:` and `parallel:` sections once:
- torchrun / srun started this process (strategy ddp or ddp_time): the launcher's process counts
  become the section's devices / num_nodes, and the world is joined now, so that rank 0's checks
  of the run folder reach every process before any of them works (parallel.launch);
- `--trainer.devices N` without a launcher: Lightning's own launcher starts the N processes when
  the Trainer is built; sample.py, which has no Trainer, starts them itself the same way
  (`start_local_processes`: the script re-run with torchrun's variables);
- `--trainer.strategy ddp_time`: the data x time mesh, parallel.time_shards processes per chain
  (unset: the whole world), checked to divide the world before anything runs.
`trainer_section(launch)` is what runs.trainer.build_trainer passes to lightning.Trainer.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from deqlit.guards import UserInputError
from deqlit.parallel.launch import external_launch, join_launched_world, launched_counts

if TYPE_CHECKING:
    import torch

    from deqlit.parallel.mesh import TimeMesh

MULTI_PROCESS = ("ddp", "ddp_time")


@dataclass
class Launch:
    section: dict[str, Any]                 # the trainer section, devices / num_nodes as started
    parallel: dict[str, Any]                # the resolved parallel section
    launched: Optional[tuple[int, int]]     # torchrun / srun: (processes per node, nodes); else None
    shards: int                             # time shards per chain (1 unless ddp_time)

    @property
    def time_sharded(self) -> bool:
        return self.section.get("strategy") == "ddp_time"


def process_rank() -> int:
    """This process's rank as a multi-process launcher set it (Lightning's DDP launcher re-runs the
    script with LOCAL_RANK set; torchrun sets RANK, SLURM SLURM_PROCID); 0 without one."""
    return max(int(os.environ.get(key, "0") or 0) for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def launched_worker() -> bool:
    """True in a process that a multi-process launcher started for rank > 0. Such a process reads
    what rank 0 checked and wrote, and writes nothing of the run's own."""
    return process_rank() > 0


def world_of(section: dict[str, Any]) -> Optional[int]:
    """devices x num_nodes of a trainer section; None while unknown ('auto', a list of devices)."""
    try:
        return int(section.get("devices", 1)) * int(section.get("num_nodes", 1))
    except (TypeError, ValueError):
        return None


def time_shards_of(section: dict[str, Any], parallel: dict[str, Any], world: Optional[int] = None) -> int:
    """Processes per chain: parallel.time_shards under --trainer.strategy ddp_time (unset: the
    whole world: `world`, the launcher's, or devices x num_nodes), else 1; 1 while unknown."""
    if section.get("strategy") != "ddp_time":
        return 1
    if parallel.get("time_shards"):
        return int(parallel["time_shards"])
    return int(world or os.environ.get("WORLD_SIZE") or world_of(section) or 1)


def prepare_launch(cfg: dict[str, Any], join: bool = True) -> Launch:
    """The launch of a resolved config (module docstring); joins a torchrun / srun world when
    `join`. Raises UserInputError for time shards without ddp_time or that do not divide the world."""
    section, parallel = dict(cfg["trainer"]), cfg["parallel"]
    strategy = section.get("strategy")
    if strategy != "ddp_time" and parallel["time_shards"] not in (None, 1):
        raise UserInputError(f"--parallel.time_shards {parallel['time_shards']} needs --trainer.strategy "
                             f"ddp_time (time sharding splits each chain over the processes)")
    launched = external_launch() if strategy in MULTI_PROCESS else None
    if launched is not None:
        section = launched_counts(section, launched)
    shards = time_shards_of(section, parallel)
    world = world_of(section)
    if strategy == "ddp_time" and world is not None and world % shards:
        start = (f"start torchrun / srun with a multiple of {shards} processes (torchrun --nproc_per_node "
                 f"{shards})" if launched is not None else f"use --trainer.devices {shards}")
        raise UserInputError(f"--parallel.time_shards {shards} needs a multiple of {shards} processes, got "
                             f"{world}: {start}, or a --parallel.time_shards that divides {world}")
    if launched is not None and join:
        join_launched_world(cfg, section)
    return Launch(section, parallel, launched, shards)


def trainer_section(launch: Launch) -> dict[str, Any]:
    """The trainer section for lightning.Trainer: strategy 'ddp_time' becomes the time-sharding
    strategy with parallel.time_shards and parallel.timeout_s (under Lightning's own launcher it
    creates the process group, whose timeout bounds how long a silent process holds the others)."""
    if not launch.time_sharded:
        return dict(launch.section)
    from deqlit.lit.time_strategy import DDPTimeStrategy
    strategy = DDPTimeStrategy(time_shards=launch.parallel.get("time_shards"),
                               timeout=timedelta(seconds=float(launch.parallel["timeout_s"])))
    return {**launch.section, "strategy": strategy}


def on_rank_zero_of(launch: Launch, fn, workers_too: bool = False) -> Any:
    """fn() on rank 0, its result or error shared with every process (parallel.launch.on_rank_zero)."""
    from deqlit.parallel.launch import on_rank_zero
    return on_rank_zero(fn, launched_worker(), launch.launched, workers_too=workers_too)


def leave_process_group() -> None:
    """Destroy the default process group if this process is in one (at exit: process_mesh)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_mesh(launch: Launch, device: "torch.device") -> Optional["TimeMesh"]:
    """The data x time mesh of a job without a Trainer (sample.py) under ddp_time, else None.

    Started by torchrun / srun, the world was joined by prepare_launch; started alone with
    --trainer.devices N, the other N - 1 processes are started here (start_local_processes)."""
    if not launch.time_sharded:
        return None
    import torch
    import torch.distributed as dist

    from deqlit.parallel.distributed import init_time_group
    from deqlit.parallel.launch import start_local_processes
    from deqlit.parallel.mesh import build_time_mesh
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        start_local_processes(world_of(launch.section) or 1)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_time_group("nccl" if device.type == "cuda" else "gloo", timeout_s=float(launch.parallel["timeout_s"]))
    # Leave the group before the interpreter tears down: a process that finishes first (rank > 0
    # returns once the samples are gathered) otherwise exits with gloo's threads still running
    # ("terminate called without an active exception", seen once in 7 runs).
    atexit.register(leave_process_group)
    return build_time_mesh(int(launch.parallel["time_shards"] or dist.get_world_size()))
