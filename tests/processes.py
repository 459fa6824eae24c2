"""The multi-process test harness: gloo process groups on CPU, each process saving its results for
the test to judge (test_sharding, test_sharded_inversion, test_sharded_joint). The processes are
forked from one forkserver that has imported torch, Lightning and deqlit once for the whole session:
a spawned process imports them itself (1.5 s; 4.5 s with Lightning, on 2 busy cores several times
that), and a 4-process world paid it four times per start. The forkserver is a single-threaded
interpreter of its own that never computes: what a test process inherits is those imports, no thread
pool and no process group of the pytest process. Command: a script's command (torchrun, Lightning's
launcher) started in the background while the test computes its one-process reference."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_in_group(rank: int, world: int, port: int, out_dir: str, timeout_s: float, body) -> None:
    """A test process: join a gloo group, run body() -> cases, and save
    {"cases", "seconds"} (or the error and its trace) as rank{rank}.pt for the test to judge."""
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        start = time.monotonic()
        result = {"cases": body(), "seconds": time.monotonic() - start}
    except Exception as err:      # reported to the test, which decides
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized() and "error" not in result:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the forkserver imports once (it stays single-threaded after them: nothing it forks inherits
# a thread pool); the test modules themselves are imported in each process (cheap after these).
PRELOAD = ["torch", "torch.distributed", "lightning", "deqlit.lit.joint_module", "deqlit.lit.time_strategy",
           "deqlit.parallel.mesh", "deqlit.parallel.distributed", "deqlit.deq.layer", "deqlit.deq.inversion",
           "deqlit.sampling", "deqlit.cli"]


def context():
    """The forkserver context with PRELOAD (set before the session's server starts)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def launch(world: int, job: str, out_dir: Path, target: Callable, wait_s: float = 240.0) -> list[dict]:
    """Start `world` processes of target(rank, world, port, job, out_dir) (a module-level function,
    pickled by reference); wait at most wait_s for all; results per rank as saved by run_in_group (None: none)."""
    ctx = context()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, job, str(out_dir)))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {wait_s} s"
    results = []
    for r in range(world):
        path = out_dir / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return results




class Command:
    """A command started now, in the background, and judged later: a test starts its multi-process
    command first and computes its one-process reference in the meantime (on one thread), so that
    the command's interpreter starts (several seconds each, mostly on one core) overlap that work.
    Its output goes to files (a pipe nobody reads while the test computes could fill and stall it);
    it runs in a session of its own, so that a failing test kills it and whatever it started
    (torchrun's and Lightning's processes). Use as a context manager; .result() waits for it."""

    def __init__(self, argv: list[str], folder: Path, name: str, timeout_s: float = 400, **popen):
        self.argv, self.timeout_s = argv, timeout_s
        self.out, self.err = folder / f"{name}.stdout", folder / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, start_new_session=True,
                                         **popen)

    def result(self) -> subprocess.CompletedProcess:
        """Wait (at most timeout_s, counted from now) and return what subprocess.run would."""
        try:
            self.proc.wait(self.timeout_s)
        finally:
            self.kill()
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "Command":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
