"""Ctrl-C while Lightning's launcher starts the other processes (`--trainer.devices 2`).

A terminal's Ctrl-C reaches every process of the run. A copy that Lightning had just started was
still importing torch: it died there with a KeyboardInterrupt traceback, Lightning's process
observer then SIGKILLed the whole run (exit 137), and rank 0 could not say it was interrupted nor
print the --resume line (the folder it had begun is refused without --resume)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import REPO, tiny_setup


def started_copy(pid: int, script: str, wait_s: float = 120.0) -> int:
    """The pid of the copy of `script` that process `pid` starts (not any helper that an import
    runs for a moment)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            break
        for child in children:
            try:
                if script in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    return int(child)
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"process {pid} started no copy of {script} within {wait_s} s")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc for the started copy")
def test_ctrl_c_while_the_other_process_starts_interrupts_the_run_cleanly(tmp_path):
    from tests.processes import Command
    config = tiny_setup(tmp_path)
    out = tmp_path / "run"
    argv = [sys.executable, str(REPO / "invert.py"), "--config", str(config), "--no-progress",
            "--trainer.devices", "2", "--trainer.strategy", "ddp_time", "--parallel.time_shards", "2",
            "--out", str(out)]
    with Command(argv, tmp_path, "run", timeout_s=300, cwd=REPO,
                 env=dict(os.environ, OMP_NUM_THREADS="1")) as command:
        started_copy(command.proc.pid, "invert.py")
        time.sleep(0.2)                      # the copy is importing torch (seconds)
        os.killpg(command.proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the run
        run = command.result()
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 128 + signal.SIGINT, run.stderr[-3000:]
    assert "interrupted by SIGINT" in run.stderr and "resume with:" in run.stderr   # as at any step
