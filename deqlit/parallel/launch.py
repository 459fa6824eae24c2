"""Joining the process mesh from a script started by torchrun or srun (no Lightning here).

`--trainer.strategy ddp_time --parallel.time_shards K` in a config or on the command line: each
process started by `torchrun --nproc_per_node N` (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK)
or by SLURM's `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/PORT set by the
job script) joins one process group and the data x time mesh; K defaults to the world size.
Jobs take the launcher's process counts (launched_counts), join the world before the Trainer does
(join_launched_world, with parallel.timeout_s), and share rank 0's checks of the output folder
(on_rank_zero) before any process starts working; a job without a Trainer (sample.py) started
with --trainer.devices N starts its N - 1 other processes itself (start_local_processes).
deqlit.runs.launch is the one caller.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from deqlit.guards import RankZeroStopped
from deqlit.parallel.distributed import init_time_group
from deqlit.parallel.mesh import TimeMesh

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_NTASKS": "WORLD_SIZE", "SLURM_LOCALID": "LOCAL_RANK"}


def environment_from_slurm() -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK from srun's variables where torchrun did not set them."""
    for slurm, torch_name in SLURM_TO_TORCH.items():
        if slurm in os.environ and torch_name not in os.environ:
            os.environ[torch_name] = os.environ[slurm]


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT of a local world)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LOCAL_CHILDREN: list[subprocess.Popen] = []     # the copies that start_local_processes started


def forward_signal(signum: int) -> None:
    """Pass a Ctrl-C / SIGTERM that this process got on to the copies it started and that still
    run: a user or scheduler signalling the first process only then stops them all as one run
    (each says it was interrupted) instead of the copies failing on its closed connection."""
    for child in _LOCAL_CHILDREN:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)


def start_local_processes(count: int) -> list[subprocess.Popen]:
    """Make this process rank 0 of a world of `count` on this machine and start ranks 1..count-1
    as copies of the same command line, with torchrun's variables (what Lightning's own launcher
    does for --trainer.devices N): then every rank joins the world as under torchrun. The copies
    are waited for at exit; one that failed makes this process exit 1 too."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(count),
           "LOCAL_WORLD_SIZE": str(count), "NODE_RANK": "0"}
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    children = [subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, **env, "RANK": str(r),
                                                                    "LOCAL_RANK": str(r)})
                for r in range(1, count)]
    _LOCAL_CHILDREN.extend(children)

    def wait() -> None:
        # A copy stopped by the same Ctrl-C / SIGTERM as this process (exit 128 + signal, or killed
        # by it) did not fail: this process says what was kept, with its own exit code.
        interrupted = {0, 128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}
        failed = [c.args for c in children if c.wait() not in interrupted]
        if failed:
            print(f"error: {len(failed)} of the {count} processes failed (see their messages above)",
                  file=sys.stderr)
            os._exit(1)
    atexit.register(wait)
    return children


def gather_over_data(mesh: TimeMesh, value: torch.Tensor) -> torch.Tensor:
    """Every replica's `value` (its share of the images along dim 0) joined in data order, on every
    process: (n_d, ...) -> (sum n_d, ...). Replicas may hold different counts."""
    return torch.cat(objects_over_data(mesh, value.detach().cpu())).to(value.device)


def objects_over_data(mesh: TimeMesh, value: Any) -> list[Any]:
    """Every replica's (picklable) `value`, in data order, on every process."""
    parts: list[Any] = [None] * mesh.data
    dist.all_gather_object(parts, value, group=mesh.data_group)
    return parts


def external_launch() -> Optional[tuple[int, int]]:
    """(processes per node, nodes) when torchrun or srun started this process as one of several
    (the launcher, not the job, decides the process count), else None. Lightning's own launcher
    (--trainer.devices N without torchrun) is not external: it starts the other processes itself."""
    if dist.is_available() and dist.is_torchelastic_launched():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        return per_node, max(1, int(os.environ.get("WORLD_SIZE", "1")) // per_node)
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "SLURM_PROCID" in os.environ:
        nodes = max(1, int(os.environ.get("SLURM_NNODES", "1") or 1))
        return tasks // nodes, nodes
    return None


def launched_counts(section: dict[str, Any], launched: tuple[int, int]) -> dict[str, Any]:
    """The trainer section with devices / num_nodes set to what the launcher started. A config
    that leaves them at 1 or auto takes the launcher's; another value that differs raises."""
    per_node, nodes = launched
    devices, num_nodes = section.get("devices", "auto"), section.get("num_nodes", 1)
    if str(devices) not in ("1", "auto", "-1", "None", str(per_node)) or str(num_nodes) not in ("1", "None", str(nodes)):
        raise ValueError(f"the launcher started {per_node} process(es) per node on {nodes} node(s), but "
                         f"the trainer section asks for devices {devices!r} and num_nodes {num_nodes!r}: "
                         f"drop --trainer.devices / --trainer.num_nodes (the launcher's counts are used) "
                         f"or start as many processes (torchrun --nproc_per_node {devices})")
    return {**section, "devices": per_node, "num_nodes": nodes}


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every process of the initialized world."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def join_launched_world(cfg: dict, section: dict[str, Any]) -> None:
    """init_process_group for a torchrun / srun start, with parallel.timeout_s (Lightning's DDP
    strategies then use this group): gloo on CPU, nccl on GPUs."""
    from deqlit.devices import placement
    if dist.is_initialized():
        return
    device, _, _ = placement(section)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_time_group("nccl" if device.type == "cuda" else "gloo",
                    timeout_s=float((cfg.get("parallel") or {}).get("timeout_s", 300)))


# What gloo / NCCL say when a peer stopped answering (timeout) or went away (connection closed).
_PEER_WORDS = ("Timed out waiting", "collective operation timeout", "Connection closed by peer",
               "Connection reset by peer", "Socket Timeout", "timed out after")


def silent_ranks(wait_s: float = 10.0) -> Optional[list[int]]:
    """After a failed collective: the ranks that did not answer. Each rank that meets the failure
    records itself in the world's store; those not recorded within `wait_s` are the silent ones
    (in a world of 2, the other rank). None when it cannot be told (no world, no store)."""
    import time

    if not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    others = [r for r in range(world) if r != rank]
    if len(others) <= 1:
        return others
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))     # the store may live in the silent process
        store.set(f"deqlit/failed-collective/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while others and time.monotonic() < deadline:
            others = [r for r in others if not store.check([f"deqlit/failed-collective/{r}"])]
            time.sleep(0.2)
        return others
    except Exception:       # the store itself did not answer: its host is among the silent
        return None


def describe_lost_peer(err: BaseException, wait_s: float = 10.0) -> Optional[str]:
    """One line for a collective that failed because another process stopped answering (gloo /
    NCCL timeout after parallel.timeout_s, or a closed connection): which rank did not answer;
    None for any other error."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not any(w in text for w in _PEER_WORDS):
        return None
    import re

    here = f"rank {dist.get_rank()}" if dist.is_initialized() else f"rank {os.environ.get('RANK', '?')}"
    waited = re.search(r"(\d+)\s*ms", text)
    # the other live ranks meet the failure within about one timeout of this one
    silent = silent_ranks(min(wait_s, int(waited.group(1)) / 1000) if waited else wait_s)
    who = ("another rank" if not silent else
           f"rank {silent[0]}" if len(silent) == 1 else "ranks " + ", ".join(map(str, silent)))
    # A closed connection names the culprit only in a world of 2: with more, it may be a peer
    # that timed out first and left (the store above tells the silent ones apart).
    if ("closed" in text or "reset" in text) and (silent is None or dist.get_world_size() <= 2):
        how = "closed its connection (it stopped or was killed)"
    elif waited is not None:
        how = f"did not answer within {int(waited.group(1)) / 1000:g} s (parallel.timeout_s)"
    else:
        how = "did not answer within parallel.timeout_s"
    return (f"{here}: {who} {how}, so this process stopped too; see {who}'s own messages (stopped, "
            f"hung or out of memory?), or raise --parallel.timeout_s if it was only slow")


def on_rank_zero(fn, worker: bool, launched: Optional[tuple[int, int]], workers_too: bool = False) -> Any:
    """fn() on rank 0. Under torchrun / srun its result, or its error, reaches every process (a
    collective: each calls this at the same point). Under Lightning's own launcher the other
    processes start once rank 0 is past this point: with workers_too they run fn() themselves."""
    if launched is None:
        return fn() if not worker or workers_too else None
    value, error = None, None
    if not worker:
        try:
            value = fn()
        except Exception as err:      # re-raised here, and named on the other ranks
            error = err
    shared = from_rank_zero((value, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RankZeroStopped(shared[1])
    return shared[0]
