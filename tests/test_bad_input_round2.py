"""Issue 20, round 2 of bad inputs and faults: each gives one `error:` line (exit 2 for bad input)
and loses nothing. A refused checkpoint writes nothing; a resume may grow a joint run's set of
images; an interrupted joint run saves whatever step the signal arrives at and never prints a
--resume command for a file that is not there; a finished run leaves no .lock.

Runs go through the scripts' main and cli.run_main in-process (same exit code and stderr);
only the signal tests start a real process.
"""
from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from deqlit.cli import run_main
from tests.tiny import error_line, load_script, run_cli, tiny_setup

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {name: load_script(f"{name}.py", f"deqlit_{name}_script_round2") for name in ("train", "invert")}
# A joint run small enough for CI: faces (shipped model), T = 3, batches of 2, the sequential solver.
JOINT = ["--task", "joint", "--data", "faces", "--joint.timesteps", "3", "--joint.num_images", "2",
         "--joint.batch_size", "2", "--joint.prior_batch_size", "2", "--joint.solver", "sequential",
         "--joint.compare_every", "0", "--joint.image_every", "0", "--joint.reference_images", "2",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_joint(tmp_path: Path, num_images: int = 2) -> list[str]:
    """A joint run of the tiny 8x8 setup (tests/tiny.py; made once per tmp_path): `num_images` of
    its 4 images."""
    config = tmp_path / "tiny.yaml"
    if not config.is_file():
        tiny_setup(tmp_path, n_images=4)
    rest = [a for i, a in enumerate(JOINT[4:]) if "--joint.num_images" not in (a, JOINT[4:][i - 1])]
    return ["--task", "joint", "--config", str(config), "--joint.split", "all", "--joint.prior_split",
            "all", *rest, "--joint.num_images", str(num_images)]


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python SCRIPT.py ARGV`, in this process."""
    return run_cli(SCRIPTS[script].main, argv, f"{script}.py", capsys)



class _Payload:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- 1. a refused checkpoint writes nothing ----------------------------------------------------
def test_invert_with_a_refused_checkpoint_writes_nothing_and_the_same_out_runs_after(tmp_path, capsys):
    config = tiny_setup(tmp_path, n_images=2)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(_Payload(tmp_path / "it_ran"), protocol=2))
    out = tmp_path / "inv"
    argv = ["--config", str(config), "--out", str(out), "--num-images", "2", "--max-steps", "1",
            "--no-progress", "--trainer.accelerator", "cpu"]
    code, _, err = run("invert", argv + ["--ckpt", str(bad)], capsys)
    assert code == 2 and "contains code that deqlit refuses to run" in error_line(err)
    assert not (tmp_path / "it_ran").exists()
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    # The same --out, with the right checkpoint, is a new run (not "an earlier inversion").
    code, _, err = run("invert", argv, capsys)
    assert code == 0, err
    assert (out / "latents.pt").is_file()
    assert not (out / ".lock").exists()        # a finished run leaves no lock file


@pytest.mark.parametrize("extra, words", [
    (["--joint.num_images", "0"], "--joint.num_images must be a positive integer"),
    (["--ckpt", "TINY"], "TINY"),      # a checkpoint of another architecture
])
def test_joint_run_refused_before_writing_anything(tmp_path, capsys, extra, words):
    tiny = tmp_path / "tiny.pt"
    from tests.conftest import perturbed_unet
    torch.save(perturbed_unet(seed=1, dtype=torch.float32).state_dict(), tiny)
    extra = [str(tiny) if e == "TINY" else e for e in extra]
    out = tmp_path / "joint"
    code, _, err = run("train", JOINT + ["--trainer.max_steps", "1", "--out", str(out), *extra], capsys)
    assert code == 2 and words.replace("TINY", str(tiny)) in error_line(err), err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


# ---- 2. a joint run resumed with more images grows its latents table ---------------------------
@pytest.mark.slow
def test_joint_resume_with_more_images_grows_the_table_and_fewer_are_refused(tmp_path, capsys):
    out = tmp_path / "joint"
    code, _, err = run("train", tiny_joint(tmp_path) + ["--trainer.max_steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    last = out / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    assert not any(k.startswith("_deq") for k in before["state_dict"])    # no second copy of the network
    more = tiny_joint(tmp_path, 3)
    code, _, err = run("train", more + ["--trainer.max_steps", "3", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    after = torch.load(last, weights_only=True)
    assert after["global_step"] == 3 and after["state_dict"]["latents.weight"].shape[0] == 3
    moments = after["optimizer_states"][0]["state"][0]
    assert moments["exp_avg"].shape[0] == moments["step"].shape[0] == 3
    # the two saved rows went on from their saved state: one more step each at most
    assert (moments["step"][:2] - before["optimizer_states"][0]["state"][0]["step"]).le(1).all()
    assert torch.load(out / "latents.pt", weights_only=True)["indices"].tolist() == [0, 1, 2]
    # Back to 2 images: the checkpoint's third latent would be dropped; refused in one line.
    code, _, err = run("train", tiny_joint(tmp_path) + ["--trainer.max_steps", "4", "--out", str(out), "--resume"], capsys)
    line = error_line(err)
    assert code == 2 and "latents of 3 images and this run has 2" in line and "--joint.num_images 3" in line
    assert torch.load(last, weights_only=True)["global_step"] == 3
    # Fewer than the saved config's: refused by the resume check, naming the saved value.
    code, _, err = run("train", tiny_joint(tmp_path, 1) + ["--trainer.max_steps", "4", "--out", str(out), "--resume"], capsys)
    line = error_line(err)
    assert code == 2 and "joint.num_images (saved 2, now 1)" in line and f"--ckpt {out}/ema.pt" in line


# ---- 3. SIGTERM at any step of a joint run saves that step, or says nothing was saved -----------
class SignalAt(Callback):
    """Sends this process SIGTERM after step `step` ("end"), or inside the save of that step
    ("save": after ExportEMA has noted it, before the file is written)."""

    def __init__(self, step: int, where: str):
        self.step, self.where = step, where

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.where == "end" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_save_checkpoint(self, trainer, *args) -> None:
        if self.where == "save" and trainer.global_step == self.step:
            self.where = "done"
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("step, where", [(0, "start"), (1, "end"), (2, "end"), (3, "save"), (4, "end")])
def test_sigterm_at_any_step_of_a_joint_run_saves_it_or_prints_no_resume(tmp_path, capsys, monkeypatch,
                                                                         step, where):
    import deqlit.runs.joint as joint
    build = joint.build_trainer

    def with_signal(launch, callbacks, **kwargs):
        if where == "start":       # before the first step finishes
            class AtStart(Callback):
                def on_train_batch_start(self, trainer, *args) -> None:
                    os.kill(os.getpid(), signal.SIGTERM)
            return build(launch, callbacks=[*callbacks, AtStart()], **kwargs)
        return build(launch, callbacks=[*callbacks, SignalAt(step, where)], **kwargs)
    monkeypatch.setattr(joint, "build_trainer", with_signal)
    out = tmp_path / "joint"
    argv = tiny_joint(tmp_path) + ["--trainer.max_steps", "50", "--joint.checkpoint_every", "3",
                                   "--out", str(out)]
    code, _, err = run("train", argv, capsys)
    last = out / "checkpoints" / "last.ckpt"
    assert code == 143, err
    if step == 0:
        assert "nothing was saved" in err and "resume with" not in err
        return
    assert f"train.py: interrupted by SIGTERM; saved {last} at step {step}" in err, err
    assert torch.load(last, weights_only=True)["global_step"] == step
    assert "resume with: python train.py" in err
    monkeypatch.setattr(joint, "build_trainer", build)
    code, _, err = run("train", argv[:-6] + ["--trainer.max_steps", str(step + 1), "--joint.checkpoint_every",
                                             "3", "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert torch.load(last, weights_only=True)["global_step"] == step + 1


# ---- 4. the folder lock is removed at the end --------------------------------------------------
def test_folder_lock_is_removed_at_the_end_and_a_stale_file_does_not_block(tmp_path):
    from deqlit.guards import OutputFolderError
    from deqlit.runs.folder_lock import LOCK_NAME, folder_lock
    (tmp_path / LOCK_NAME).write_text("invert.py (pid 999999)")     # left by a killed process
    with folder_lock(tmp_path, "invert.py"):
        with pytest.raises(OutputFolderError, match=r"in use by invert.py \(pid"):
            with folder_lock(tmp_path, "sample.py"):
                pass
        assert (tmp_path / LOCK_NAME).is_file()      # a refused second run leaves the holder's file
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path, "invert.py"):
            raise RuntimeError("a failed run")
    assert not (tmp_path / LOCK_NAME).exists()


# ---- 5. a folder without images says what it holds ---------------------------------------------
def test_a_folder_without_images_says_what_it_holds(tmp_path):
    from deqlit.data.folders import DatasetNotFoundError, load_local_dataset

    def problem(folder: Path) -> str:
        with pytest.raises(DatasetNotFoundError) as err:
            load_local_dataset(f"folder:{folder}", "all", 8, 1, limit=1)
        return str(err.value).splitlines()[0]
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "x").symlink_to("x")
    assert problem(loop).endswith(f"folder {loop} holds no .jpg/.jpeg/.png/.webp/.tif/.tiff files: it "
                                  f"holds 1 entry, a symlink loop: x -> x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problem(empty).endswith("files: it is empty")
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    (mixed / "notes.txt").write_text("")
    (mixed / "a.png").symlink_to("gone.png")
    assert "holds 3 entries: a broken symlink: a.png -> gone.png; a file: notes.txt; a folder: sub" in problem(mixed)


def test_symlinks_to_nothing_beside_images_are_named_in_a_warning(tmp_path):
    import numpy as np
    from PIL import Image

    from deqlit.data.folders import image_files
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to("b.png")
    with pytest.warns(UserWarning, match=r"skipped 1 symlink\(s\) that lead to no file \(a symlink loop: b.png -> b.png\)"):
        assert image_files(tmp_path) == [tmp_path / "a.png"]


# ---- 6. a rank that stops answering is named in one line ----------------------------------------
@pytest.mark.slow
def test_a_rank_that_stops_answering_is_named_in_one_line(tmp_path):
    world = 3      # the silent rank told apart from a peer that timed out too (a world of 2: the other)
    from tests.processes import launch
    from tests.silent_rank import silent_rank_worker
    results = launch(world, "silent", tmp_path, silent_rank_worker, wait_s=60)
    for rank in range(world - 1):
        message, code = results[rank]["cases"]
        assert code == 1 and "\n" not in message, message
        assert message.startswith(f"rank {rank}: rank {world - 1} did not answer within"), message


def test_world_size_advice_names_the_launcher(monkeypatch):
    from deqlit.guards import UserInputError
    from deqlit.runs.launch import prepare_launch
    from deqlit.runs.sections import resolve
    cfg = resolve({"trainer": {"strategy": "ddp_time", "devices": 2}, "parallel": {"time_shards": 3}}, "sample")
    with pytest.raises(UserInputError, match="use --trainer.devices 3"):
        prepare_launch(cfg, join=False)
    monkeypatch.setattr("deqlit.runs.launch.external_launch", lambda: (2, 1))    # torchrun, 2 processes
    with pytest.raises(UserInputError) as err:
        prepare_launch(cfg, join=False)
    assert "torchrun --nproc_per_node 3" in str(err.value) and "--trainer.devices" not in str(err.value)


# ---- 7. a full disk in TensorBoard's writer thread is one error line ---------------------------
def _tensorboard_on_a_full_disk(folder: Path, main_fails: bool):
    """An entry point whose TensorBoard event file is /dev/full (every write: ENOSPC): its writer
    thread fails, and then the main thread's next flush too (main_fails) or nothing more."""
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def main(argv):
        writer = EventFileWriter(str(folder))
        events = next(folder.glob("events.*"))
        events.unlink()
        events.symlink_to("/dev/full")
        writer.add_event(Event())
        worker = writer._async_writer._worker
        deadline = time.monotonic() + 10
        while worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if main_fails:
            writer.flush()         # raises the thread's OSError here
    return main


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("main_fails", [True, False])
def test_full_disk_in_tensorboards_writer_thread_is_one_line(tmp_path, capsys, main_fails):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(_tensorboard_on_a_full_disk(tmp_path, main_fails), [], script="train.py")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err and "Exception in thread" not in err, err
    assert error_line(err) == ("error: no space left on device while writing TensorBoard's event file "
                               "(RUN/tb/); free space or choose another --out")


def test_full_disk_in_a_move_names_the_destination():
    import errno

    from deqlit.cli import describe_error
    moved = OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpabc", None, "/run/checkpoints/step-60.ckpt")
    assert describe_error(moved)[0].startswith("no space left on device while writing /run/checkpoints/step-60.ckpt;")
