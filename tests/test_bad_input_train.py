"""train.py under faults a user meets: a diverging run, a re-run into an earlier run's folder,
unusable output folders, a corrupt checkpoint to resume, Ctrl-C and SIGTERM mid-run.

Each case asserts the exit code, the message's key words, and that no file the user had changed.
Runs go through train.py's main and cli.run_main in-process (the exit code and stderr are the
same as the script's); only the signal tests start a real process, since signals are the point.
"""
from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.tiny import error_line, load_script, run_train, tree_hashes

from deqlit import guards
from deqlit.guards import NonFiniteError
from deqlit.runs.training import ExportEMA

REPO = Path(__file__).resolve().parent.parent

# A tiny UNet on 16x16 faces; sample_every 0: no sample grids (not what is tested here).
TINY = ["--model.ch", "8", "--model.ch_mult", "[1,2]", "--model.num_res_blocks", "1",
        "--model.attn_resolutions", "[]", "--model.norm_groups", "4", "--model.resolution", "16",
        "--data.resolution", "16", "--batch-size", "4", "--train.sample_every", "0",
        "--train.warmup_steps", "1", "--train.steps_per_epoch", "1000"]


train_script = load_script("train.py", "deqlit_train_script_bad")


pytestmark = pytest.mark.usefixtures("one_thread")




def all_finite(path: Path) -> bool:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj)
    return all(v.isfinite().all() for v in sd.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished 2-step run, as a user's earlier work."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    train_script.main(TINY + ["--max-steps", "2", "--train.checkpoint_every", "1", "--out", str(out)])
    assert (out / "ema.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    return out


# ---- 1. a diverging run ----------------------------------------------------------------------
def test_nan_loss_stops_with_the_step_and_remedies_and_keeps_the_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_train(TINY + ["--max-steps", "30", "--lr", "1e4", "--train.checkpoint_every",
                                  "1", "--out", str(out)], capsys)
    assert code == 1
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    step = int(re.search(r"diverged at step (\d+): the loss is (nan|inf)", line).group(1))
    assert "--lr, now 10000" in line and "--train.grad_clip" in line
    last = out / "checkpoints" / "last.ckpt"
    # Checkpoints every step: the kept one is the step before the NaN, with finite weights.
    assert f"{last} (step {step - 1})" in line
    assert torch.load(last, weights_only=True)["global_step"] == step - 1
    assert all_finite(last) and all_finite(out / "ema.pt")


def test_nonfinite_weights_are_never_saved(tmp_path):
    """The guard of every checkpoint (and ema.pt): NaN in any weight refuses the save."""
    ema_path = tmp_path / "ema.pt"
    ema_path.write_bytes(b"the user's earlier ema.pt")
    export = ExportEMA(ema_path)
    sd = {"model.w": torch.ones(3), "ema.module.w": torch.tensor([1.0, float("nan"), 0.0]),
          "ema.n_averaged": torch.tensor(3)}

    class Trainer:
        global_step, is_global_zero = 7, True

    with pytest.raises(NonFiniteError, match=r"step 7.*ema\.module\.w.*NaN"):
        export.on_save_checkpoint(Trainer(), None, {"state_dict": sd})
    assert ema_path.read_bytes() == b"the user's earlier ema.pt"
    assert guards.first_nonfinite({"a": torch.ones(2), "b": torch.tensor([float("inf")])}) == "b"
    assert guards.first_nonfinite({"a": torch.ones(2), "n": torch.tensor(3)}) is None


# ---- 2. never overwrite a user's model -------------------------------------------------------
def test_rerun_into_an_earlier_run_is_refused_and_changes_nothing(earlier_run, capsys):
    before = tree_hashes(earlier_run)
    code, err = run_train(TINY + ["--max-steps", "2", "--out", str(earlier_run)], capsys)
    assert code == 2
    assert f"error: {earlier_run} holds an earlier run" in err
    assert "--resume" in err and "--out NEW_FOLDER" in err
    assert tree_hashes(earlier_run) == before


def test_default_out_is_protected_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "train-faces"  # configs/faces.yaml's train.out, relative to cwd
    run.mkdir(parents=True)
    (run / "ema.pt").write_bytes(b"weights")
    code, err = run_train(TINY + ["--max-steps", "2"], capsys)
    assert code == 2 and "runs/train-faces holds an earlier run (ema.pt)" in err
    assert (run / "ema.pt").read_bytes() == b"weights" and not (run / "config.yaml").exists()


def test_missing_data_leaves_no_run_folder(tmp_path, capsys):
    # The dataset is checked before the output folder (and its parents) are created.
    out = tmp_path / "runs" / "train-cifar10"
    code, err = run_train(["--data", "cifar10", "--data.root", str(tmp_path / "none"), "--out", str(out)], capsys)
    assert code == 2 and "cifar10" in error_line(err) and not (tmp_path / "runs").exists()


def test_out_naming_an_existing_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = run_train(TINY + ["--max-steps", "2", "--out", str(target)], capsys)
    assert code == 2 and f"--out {target} is an existing file, not a folder" in err
    assert "Traceback" not in err and target.read_text() == "mine"


def test_unwritable_out_is_refused_before_any_compute(tmp_path, monkeypatch, capsys):
    # root writes through permission bits, so the refusal of the write itself is simulated.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    out = tmp_path / "ro"
    code, err = run_train(TINY + ["--max-steps", "2", "--out", str(out)], capsys)
    assert code == 2 and f"cannot write to --out {out} (Permission denied)" in err
    assert not any(out.iterdir())  # nothing written, nothing trained


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores a read-only folder's permission bits")
def test_read_only_out_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, err = run_train(TINY + ["--max-steps", "2", "--out", str(out)], capsys)
    finally:
        out.chmod(0o700)
    assert code == 2 and f"cannot write to --out {out}" in err


def test_atomic_save_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "ema.pt"
    path.write_bytes(b"old")
    monkeypatch.setattr(guards, "open", lambda p, mode: open("/dev/full", mode), raising=False)
    with pytest.raises(guards.DiskFullError, match=f"no space left on device while writing {path}"):
        guards.atomic_torch_save({"w": torch.ones(4096)}, path)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ema.pt"]


# ---- 3. resume from a corrupt checkpoint -----------------------------------------------------
def test_corrupt_last_ckpt_on_resume_is_named_with_how_to_start_over(earlier_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a truncated copy
    before = tree_hashes(run)
    code, err = run_train(TINY + ["--max-steps", "4", "--out", str(run), "--resume"], capsys)
    assert code == 2
    assert f"cannot resume: {last} is corrupt or truncated" in err
    assert "--out NEW_FOLDER" in err and "step-2.ckpt" in err  # the earlier checkpoint it can use
    assert tree_hashes(run) == before


# ---- 4. Ctrl-C and SIGTERM save, print the resume command, and resume continues ----------------
def _interrupt(out: Path, sig: int) -> subprocess.CompletedProcess:
    argv = [sys.executable, "train.py", *TINY, "--max-steps", "100000",
            "--train.checkpoint_every", "100000", "--train.log_every_n_steps", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # TensorBoard's event file appears at the first logged step: training is under way.
    deadline = time.monotonic() + 120
    while not list((out / "tb").rglob("events.*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # a few more steps
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"),
                                             (signal.SIGINT, 130, "SIGINT")])
def test_interrupt_saves_prints_resume_and_resume_continues(tmp_path, capsys, sig, code, name):
    out = tmp_path / "run"
    result = _interrupt(out, sig)
    last = out / "checkpoints" / "last.ckpt"
    assert result.returncode == code, result.stderr[-2000:]
    match = re.search(rf"train\.py: interrupted by {name}; saved {re.escape(str(last))} at step (\d+)",
                      result.stderr)
    assert match, result.stderr[-2000:]
    step = int(match.group(1))
    assert "resume with: python train.py " in result.stderr and result.stderr.rstrip().endswith("--resume")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == step >= 1 and all_finite(last) and all_finite(out / "ema.pt")
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == step

    # The printed command, with a smaller --max-steps, continues from the saved step.
    argv = shlex.split(re.search(r"resume with: python train\.py (.*)", result.stderr).group(1))
    argv[argv.index("--max-steps") + 1] = str(step + 2)
    assert run_train(argv, capsys)[0] == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == step + 2 and int(resumed["state_dict"]["ema.n_averaged"]) == step + 2
