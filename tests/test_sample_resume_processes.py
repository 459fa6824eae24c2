"""sample.py's saved batches and --resume across processes (--trainer.strategy ddp_time): each data
replica writes its own batch files, --resume reads them back on every process, and a folder that
rank 0 refuses stops the other processes at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deqlit.deq.solvers import SolverStats
from deqlit.runs import sample_batches
from tests.conftest import REPO

# Two processes started by sample.py itself, two data replicas of one time shard each: 5 images
# are split 3 + 2, and in solves of 2 images replica 0 has batches 0 (images 0-1) and 1 (image 2),
# replica 1 has batch 0 (images 3-4).
COMMON = ["--timesteps", "4", "--num-images", "5", "--batch-size", "2", "--solver", "newton-scan",
          "--tol", "1e-4", "--no-progress", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
          "--trainer.strategy", "ddp_time", "--parallel.time_shards", "1", "--parallel.timeout_s", "120"]


def sample_py(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *COMMON, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_two_replica_run_resumes_from_each_replicas_batch_files(tmp_path):
    """The batch files a stopped run left (made here from the finished run's samples, shifted by
    0.5 so that their use shows) are taken as they are on the replica that wrote them; only the
    missing batch (replica 0's batch 0) is solved again and equals the uninterrupted run."""
    whole = sample_py(["--out", str(tmp_path / "whole")], REPO)
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = torch.load(tmp_path / "whole" / "samples.pt", weights_only=True)["x0"]
    assert reference.shape[0] == 5 and not (tmp_path / "whole" / "batches").exists()
    identity = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert identity["data_replicas"] == 2

    part = tmp_path / "part"
    part.mkdir()
    sample_batches.write_identity(part, identity)
    stats = SolverStats(iterations=3, converged=True, abs_residual=[1.0, 0.1, 0.01],
                        rel_residual=[1.0, 0.1, 1e-5], image_residual=[1e-5], image_iterations=[3], network_rows=12)
    sample_batches.save_batch(part, 1, reference[2:3] + 0.5, stats, replica=0, replicas=2)
    two = SolverStats(**{**stats.__dict__, "image_residual": [1e-5] * 2, "image_iterations": [3, 3]})
    sample_batches.save_batch(part, 0, reference[3:5] + 0.5, two, replica=1, replicas=2)
    assert sorted(p.name for p in (part / "batches").iterdir()) == [
        "replica-000-batch-000001.pt", "replica-001-batch-000000.pt"]

    resumed = sample_py(["--out", str(part), "--resume"], REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed: 2 finished batch(es) of up to 2 image(s)" in resumed.stdout
    x0 = torch.load(part / "samples.pt", weights_only=True)["x0"]
    assert torch.allclose(x0[:2], reference[:2], atol=1e-6)           # solved again
    assert torch.equal(x0[2:3], reference[2:3] + 0.5)                 # read from replica 0's file
    assert torch.equal(x0[3:5], reference[3:5] + 0.5)                 # read from replica 1's file
    assert not (part / "batches").exists()


@pytest.mark.slow
def test_a_resume_that_rank_zero_refuses_stops_every_process_at_once(tmp_path):
    """--resume on a folder that holds no run: rank 0 refuses it by name, and the other process
    stops with rank 0's reason instead of waiting in the solver's first collective until the
    timeout; the folder is left as it was."""
    part = tmp_path / "part"
    part.mkdir()
    (part / "notes.txt").write_text("mine")
    refused = sample_py(["--out", str(part), "--resume"], REPO)
    assert refused.returncode != 0
    assert "holds no sample.py run (run.json is missing)" in refused.stderr
    assert "rank 0 stopped the run" in refused.stderr            # the other process heard why
    assert sorted(p.name for p in part.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_ddp_over_two_devices_samples_on_two_replicas_and_rank_zero_computes_the_metrics(tmp_path):
    """--trainer.strategy ddp is data-parallel sampling (the ddp_time mesh with one time shard),
    not one silent process; --metrics are computed on rank 0 from the gathered samples, without a
    sync that would wait on the processes that have already returned."""
    args = ["--timesteps", "4", "--num-images", "4", "--no-progress", "--metrics", "fd-random",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--parallel.timeout_s", "120", "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "sample.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "o" / "run.json").read_text())["data_replicas"] == 2
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["fd-random"] >= 0
    assert torch.load(tmp_path / "o" / "samples.pt", weights_only=True)["x0"].shape[0] == 4
    # The solve's figures are those of all 4 images, as one process reports them (not rank 0's 2).
    one = subprocess.run([sys.executable, str(REPO / "sample.py"), *args[:4], "--no-progress",
                          "--trainer.accelerator", "cpu", "--out", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    alone = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["image_iterations"] == alone["image_iterations"] and len(alone["image_iterations"]) == 4
    assert metrics["iterations"] == alone["iterations"]
    assert metrics["image_residual"] == pytest.approx(alone["image_residual"], rel=1e-3, abs=1e-7)
    assert len(metrics["residual_trace"]) == len(alone["residual_trace"])


@pytest.mark.slow
def test_sigterm_to_the_first_process_only_stops_the_run_as_one(tmp_path):
    """A scheduler or user signals the process they started (the one that started the copy): it
    passes the signal on, so the run ends as interrupted (exit 143, what was kept, the resume
    line), not with the copy failing on the closed connection and exit 1."""
    import signal
    import time
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(REPO / "sample.py"), *COMMON, "--num-images", "40", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob(sample_batches.BATCH_FILES)) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "finished batch(es) of up to 2 image(s) kept in" in err and "resume with:" in err
    assert "processes failed" not in err and "closed its connection" not in err, err[-3000:]
