"""train.py --resume continues the random streams of the run it resumes: a run interrupted by
Ctrl-C and resumed ends with the same weights, bitwise, as one that never stopped.

The checkpoint holds no RNG state and every start seeds the process-wide RNGs again, so what a
training step draws (flips, timesteps, noise, dropout masks, the images of its batch) must be a
function of the run's seed and the step alone. The runs are train.py's tiny faces run (tests/tiny),
with dropout on so that its masks are covered too; the interrupt is a real SIGINT, sent from inside
a step, which the run honours at the step's end (runs/guards.StopAtStepBoundary) after saving
last.ckpt, as a user's Ctrl-C would be.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from deqlit.guards import RunInterrupted
from deqlit.lit.datamodule import StepStream
from deqlit.lit.train_module import DiffusionTrainModule
from tests.tiny import TINY, train_script

STEPS = 7   # steps_per_epoch is 3 (TINY): epochs 0 and 1 full, epoch 2 begun


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions on one thread (as tests/test_train.py): faster on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(out: Path, *extra: str) -> Path:
    argv = ["--data", "faces", "--max-steps", str(STEPS), "--batch-size", "8", "--out", str(out),
            "--model.dropout", "0.1", "--train.sample_every", "0", "--trainer.enable_progress_bar", "false"]
    for key, value in TINY.items():
        argv += [f"--{key}", value]
    train_script.main(argv + list(extra))
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The network and EMA weights of the run's last.ckpt (which must be at step STEPS)."""
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    return weights(train(tmp_path_factory.mktemp("whole") / "run"))


def interrupt_after(monkeypatch, step: int) -> None:
    """SIGINT to this process inside training step `step` (from on_train_batch_end)."""
    original = DiffusionTrainModule.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, outputs, batch, batch_idx)
    monkeypatch.setattr(DiffusionTrainModule, "on_train_batch_end", on_train_batch_end)


# checkpoint_every is 2 (TINY), so the last.ckpt resumed from is: at 3, the end of epoch 0, saved by
# SaveLast on the interrupt; at 4, mid-epoch, ModelCheckpoint's (saved at the step's end, a different
# restart for Lightning's loops); at 5, mid-epoch, SaveLast's. Mid-epoch, the batches done are skipped.
@pytest.mark.parametrize("stop", [3, 4, 5])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, uninterrupted, stop):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after(patch, stop)
        with pytest.raises(RunInterrupted):
            train(out)
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == stop
    resumed = weights(train(out, "--resume"))
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    if differ:
        gap = (resumed[differ[0]].double() - uninterrupted[differ[0]].double()).abs().max()
        raise AssertionError(f"{len(differ)} tensors differ, e.g. {differ[0]} by up to {gap:.3g}")


def test_step_stream_splits_each_global_batch_and_resumes_from_the_step():
    """The data order alone, no training: DDP's shares and a mid-epoch restart (what the runs
    above cannot show on one process)."""
    whole = list(StepStream(10, batch_size=4, steps_per_epoch=3, seed=1))          # epoch 0
    assert len(whole) == 12 and set(whole) <= set(range(10))
    # Two processes of batch 2: global batch s is the one-process batch s of 4, split in order.
    shares = [list(StepStream(10, 2, 3, seed=1, rank=r, replicas=2)) for r in (0, 1)]
    assert [i for s in range(3) for r in (0, 1) for i in shares[r][2 * s:2 * s + 2]] == whole
    # After 4 batches (epoch 1, one done) a fresh iterator continues epoch 1; set_epoch is ignored.
    epoch1 = list(StepStream(10, 4, 3, seed=1, done=lambda: 3))
    resumed = StepStream(10, 4, 3, seed=1, done=lambda: 4)
    resumed.set_epoch(0)
    assert list(resumed) == epoch1[4:] and epoch1 != whole
    assert list(StepStream(10, 4, 3, seed=2)) != whole


def logged_losses(out: Path) -> dict[int, float]:
    """TensorBoard's train/loss points of a run folder (every event file): step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    points = {}
    for path in sorted((out / "tb").rglob("events*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            points.update({s.step: s.value for s in events.Scalars("train/loss")})
    return points


def test_a_resumed_runs_curve_lies_on_the_uninterrupted_one(tmp_path, monkeypatch):
    """The loss of every step is logged at the same TensorBoard step as in the uninterrupted run
    (an interrupt saved mid-loop once shifted every point after the resume one step to the right)."""
    whole = train(tmp_path / "whole", "--train.log_every_n_steps", "1")
    out = tmp_path / "part"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)
        with pytest.raises(RunInterrupted):
            train(out, "--train.log_every_n_steps", "1")
    train(out, "--train.log_every_n_steps", "1", "--resume")
    expected, got = logged_losses(whole), logged_losses(out)
    assert sorted(got) == sorted(expected) == list(range(STEPS))
    assert got == pytest.approx(expected, rel=1e-6)


def test_the_epoch_order_follows_the_restored_step_not_set_epoch():
    """EpochSampler with progress(): the epoch and the batches done come from the global step when an
    iterator starts (Lightning draws a resumed fit's first indices before set_epoch, with workers)."""
    from deqlit.lit.joint_data import EpochSampler
    step = {"now": 0}
    sampler = EpochSampler(10, 7, None, 2, 5, lambda: step["now"])
    epochs = []
    for epoch in range(3):
        step["now"] = epoch * 5
        epochs.append(list(sampler))
    assert epochs[0] != epochs[1] != epochs[2] and all(sorted(e) == list(range(10)) for e in epochs)
    fresh = EpochSampler(10, 7, None, 2, 5, lambda: step["now"])
    fresh.set_epoch(0)                    # a stale set_epoch, as before Lightning calls it on resume
    step["now"] = 5 + 3                   # resumed after 3 of epoch 1's 5 batches
    assert list(fresh) == epochs[1][3 * 2:]
