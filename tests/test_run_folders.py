"""One rule for every command's run folder: a folder in use by another process, or holding what
any deqlit run leaves (config.yaml, tb/, checkpoints, ema.pt, run.json, latents ...), is refused
by train.py, joint fine-tuning and invert.py alike; a training run that fails before its first
checkpoint, and a --fast-dev-run step, leave nothing behind; an interrupt that lands as the last
step ends offers no --resume that would be refused."""
from __future__ import annotations

from pathlib import Path

import pytest

from deqlit.lit.checkpoints import ExportEMA, SaveLast
from deqlit.runs.folder_lock import folder_holder, folder_lock
from tests.tiny import run_train
from tests.test_bad_input_train import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_py_refuses_a_folder_that_another_command_holds(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with folder_lock(out, "invert.py"):
        assert folder_holder(out).startswith("invert.py (pid ")
        code, err = run_train(TINY + ["--max-steps", "1", "--out", str(out)], capsys)
    assert code == 2 and f"{out} is in use by invert.py (pid " in err
    assert folder_holder(out) is None and sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("left", ["config.yaml", "run.json", "tb/events.out", "latents/part-00000000.pt"])
def test_train_py_refuses_the_folder_of_another_commands_run(tmp_path, capsys, left):
    out = tmp_path / "inversion"
    (out / left).parent.mkdir(parents=True, exist_ok=True)
    (out / left).write_text("an inversion's file")
    code, err = run_train(TINY + ["--max-steps", "1", "--out", str(out)], capsys)
    assert code == 2 and f"{out} holds an earlier run ({Path(left).parts[0]})" in err
    assert "--resume" not in err          # not a training run: train.py --resume could not continue it
    assert (out / left).read_text() == "an inversion's file"


def test_invert_py_refuses_a_training_run_folder(tmp_path, capsys):
    from tests.test_run_layer import run
    out = tmp_path / "training"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"a training checkpoint")
    (out / "config.yaml").write_text("train: {}\n")
    code, _, err = run("invert", ["--num-images", "1", "--timesteps", "2", "--out", str(out)], capsys)
    assert code == 2 and "holds an earlier run (config.yaml, checkpoints)" in err
    assert (out / "config.yaml").read_text() == "train: {}\n"


def test_a_training_run_that_diverges_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, err = run_train(TINY + ["--max-steps", "30", "--lr", "1e4", "--train.checkpoint_every", "100",
                                  "--out", str(out)], capsys)
    assert code == 1 and "diverged at step" in err and "No checkpoint had been written yet" in err
    assert not out.exists()                 # config.yaml, tb/ and the folder itself removed
    code, err = run_train(TINY + ["--max-steps", "1", "--out", str(out)], capsys)   # the corrected rerun
    assert code == 0, err


def test_fast_dev_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "debug"
    code, err = run_train(TINY + ["--out", str(out), "--fast-dev-run"], capsys)
    assert code == 0, err
    assert not out.exists()


def test_an_interrupt_after_the_last_step_offers_no_resume(tmp_path):
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"saved")
    saver = SaveLast(last, ExportEMA(tmp_path / "ema.pt"))
    saver.written_step = 8
    kept, resumable = saver.interrupted(8, None, max_steps=8)
    assert not resumable and "all 8 steps were done" in kept
    kept, resumable = saver.interrupted(8, None, max_steps=10)
    assert resumable and kept == f"saved {last} at step 8"
    kept, resumable = saver.interrupted(8, None, max_steps=-1)     # Lightning's "no step limit"
    assert resumable


def test_an_inversion_started_before_on_fail_was_recorded_still_resumes():
    """run.json of an earlier version left exact.on_fail out when it was the default: read as
    'warn', the value this version records, so --resume does not refuse it as a changed setting."""
    from deqlit.runs.inversion import recorded_settings_only
    old = {"settings": {"task": "reconstruct", "method": "exact", "exact": {"mode": "per-step", "tol": 1e-6}}}
    assert recorded_settings_only(old)["settings"]["exact"] == {"mode": "per-step", "tol": 1e-6, "on_fail": "warn"}
    new = {"settings": {"task": "reconstruct", "exact": {"on_fail": "raise"}}}
    assert recorded_settings_only(new)["settings"]["exact"] == {"on_fail": "raise"}
