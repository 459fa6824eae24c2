"""The run layer (deqlit/runs/): the typed config's errors and defaults, --help / --print_config,
the one Trainer factory, and joint runs through the trainer section (max_steps, precision, resume)."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deqlit.config import ConfigError, load_config
from deqlit.runs.sections import resolve
from tests.tiny import error_line, load_script, run_cli

REPO = Path(__file__).resolve().parent.parent
FACES = REPO / "configs" / "faces.yaml"
SCRIPTS = {name: load_script(f"{name}.py", f"deqlit_{name}_script_runs") for name in ("train", "invert", "sample")}
# A joint run small enough for CI: 4 faces, T = 3, batches of 2, the sequential solver.
JOINT = ["--task", "joint", "--data", "faces", "--joint.timesteps", "3", "--joint.num_images", "4",
         "--joint.batch_size", "2", "--joint.prior_batch_size", "2", "--joint.solver", "sequential",
         "--joint.compare_every", "0", "--joint.image_every", "0", "--joint.reference_images", "4",
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python SCRIPT.py ARGV`, in this process."""
    return run_cli(SCRIPTS[script].main, argv, f"{script}.py", capsys)



@pytest.mark.parametrize("script, argv, words", [
    ("invert", ["--inversion.methdo", "deq"], ["unknown key 'methdo'", "did you mean --inversion.method"]),
    ("sample", ["--bogus", "1"], ["unrecognized argument '--bogus'"]),
    ("train", ["--no-progress"], ["unrecognized argument '--no-progress'"]),
    ("train", ["--task", "joint", "--joint.max_steps", "3"], ["joint.max_steps", "--trainer.max_steps 3"]),
    ("train", ["--task", "joint", "--joint.progress_bar", "false"], ["--trainer.enable_progress_bar"]),
    ("train", ["--task", "joint", "--joint.devices", "2"], ["--trainer.devices 2"]),
    ("train", ["--task", "joint", "--joint.accelerator", "cpu"], ["--trainer.accelerator cpu"]),
    ("invert", ["--trainer.max_epoch", "3"], ["max_epoch", "did you mean max_epochs"]),
])
def test_bad_flags_are_one_error_line_with_exit_2(script, argv, words, capsys):
    code, _, err = run(script, argv, capsys)
    line = error_line(err)
    assert code == 2 and all(w in line for w in words), line


@pytest.mark.parametrize("text, words", [
    ("inversion:\n  method: deq\nbogus:\n  a: 1\n", ["unknown config section 'bogus'"]),
    ("inversion:\n  method: [deq\n", ["is not valid YAML", "line"]),
    ("inversion: [1, 2]\n", ["section 'inversion' must be a mapping", "[1, 2]"]),
    ("joint:\n  max_steps: 5\n", ["joint.max_steps", "--trainer.max_steps 5"]),
    ("inversion:\n  num_images: many\n", ["inversion.num_images", "an integer"]),
])
def test_bad_config_files_are_one_error_line_with_exit_2(tmp_path, text, words, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("base: " + str(FACES) + "\n" + text)
    code, _, err = run("invert", ["--config", str(path), "--print_config"], capsys)
    line = error_line(err)
    assert code == 2 and all(w in line for w in words), line


@pytest.mark.parametrize("script", ["train", "invert", "sample"])
def test_help_lists_every_flag_the_script_accepts(script, capsys):
    code, out, _ = run(script, ["--help"], capsys)
    assert code == 0
    wanted = ["--data", "--config", "--debug", "--print_config"] + (["--resume"] if script != "sample" else [])
    assert all(flag in out for flag in wanted), out


def test_print_config_is_the_resolved_config_and_replays(tmp_path, capsys):
    code, out, _ = run("invert", ["--method", "deq", "--inversion.lr", "0.02", "--print_config"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["inversion"]["method"] == "deq" and printed["inversion"]["lr"] == 0.02
    assert printed == resolve(printed, "invert")           # complete: resolving adds nothing
    saved = tmp_path / "config.yaml"
    saved.write_text(out)
    code, again, _ = run("invert", ["--config", str(saved), "--print_config"], capsys)
    assert code == 0 and yaml.safe_load(again) == printed   # --config RUN/config.yaml replays it
    code, joint, _ = run("train", ["--task", "joint", "--print_config"], capsys)
    assert yaml.safe_load(joint)["trainer"]["max_steps"] == 600   # the joint job's Trainer default, shown


def test_every_default_has_one_home():
    from deqlit.lit.metrics_callback import SampleMetrics
    from deqlit.lit.train_module import DiffusionTrainModule
    params = inspect.signature(DiffusionTrainModule).parameters
    train = resolve({})["train"]
    assert train["sample_timesteps"] == params["sample_timesteps"].default
    assert train["sample_solver"] == params["sample_solver"].default
    metrics = inspect.signature(SampleMetrics).parameters     # no second default to disagree with
    assert metrics["timesteps"].default is inspect.Parameter.empty
    assert metrics["solver"].default is inspect.Parameter.empty
    # The shipped configs resolve, and resolving twice changes nothing.
    for path in sorted((REPO / "configs").glob("*.yaml")):
        once = resolve(load_config(path))
        assert resolve(once) == once, path.name
    with pytest.raises(ConfigError, match="did you mean --joint.network_lr"):
        resolve({"joint": {"network_lrr": 1e-4}})


def test_the_trainer_factory_honours_every_key_of_the_section(tmp_path):
    from deqlit.runs.launch import prepare_launch
    from deqlit.runs.trainer import build_trainer
    cfg = resolve({"trainer": {"accelerator": "cpu", "devices": 1, "precision": "64-true", "max_steps": 3,
                               "enable_progress_bar": False, "limit_val_batches": 0}}, "joint")
    trainer = build_trainer(prepare_launch(cfg), max_steps=600, enable_progress_bar=True, logger=False,
                            default_root_dir=str(tmp_path))
    assert trainer.max_steps == 3 and trainer.progress_bar_callback is None
    assert trainer.precision == "64-true" and trainer.limit_val_batches == 0


@pytest.mark.slow
def test_joint_run_takes_max_steps_and_precision_from_the_trainer_section(tmp_path, capsys):
    out = tmp_path / "joint"
    code, _, err = run("train", JOINT + ["--trainer.max_steps", "2", "--trainer.precision", "64-true",
                                         "--out", str(out)], capsys)
    assert code == 0, err
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    ema = torch.load(out / "ema.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float64 for v in ema.values() if v.is_floating_point())
    saved = load_config(out / "config.yaml")
    assert saved["trainer"]["max_steps"] == 2 and "max_steps" not in saved["joint"]
    # One resume check: a changed setting is refused naming saved and new value ...
    code, _, err = run("train", JOINT + ["--trainer.max_steps", "3", "--trainer.precision", "64-true",
                                         "--joint.latent_lr", "0.5", "--out", str(out), "--resume"], capsys)
    line = error_line(err)
    assert code == 2 and "joint.latent_lr (saved 0.08, now 0.5)" in line, line
    # ... and more steps are not.
    code, _, err = run("train", JOINT + ["--trainer.max_steps", "3", "--trainer.precision", "64-true",
                                         "--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (out / "resumes.yaml").is_file()


@pytest.mark.slow
def test_sample_on_two_time_shards_started_by_trainer_devices_equals_one_process(tmp_path, capsys, one_thread):
    # float64: the two solves then take the same iterations (T = 7: blocks of 4 and 3 rows, and the
    # solve stops on tol after 6 < T iterations), and only the order of the sums differs. The
    # command starts first: its two interpreter starts (Lightning's launcher starts the second)
    # overlap the one-process run, in this process on one thread.
    from tests.processes import Command
    common = ["--timesteps", "7", "--num-images", "2", "--no-progress", "--trainer.accelerator", "cpu",
              "--trainer.precision", "64-true"]
    with Command([sys.executable, "sample.py", *common, "--out", str(tmp_path / "two"), "--trainer.devices", "2",
                  "--trainer.strategy", "ddp_time", "--parallel.time_shards", "2", "--compare-sequential"],
                 tmp_path, "two", timeout_s=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}) as command:
        code, _, err = run("sample", common + ["--out", str(tmp_path / "one")], capsys)
        assert code == 0, err
        done = command.result()
    assert done.returncode == 0, done.stderr[-2000:]
    one = torch.load(tmp_path / "one" / "samples.pt", weights_only=True)["x0"]
    two = torch.load(tmp_path / "two" / "samples.pt", weights_only=True)["x0"]
    assert one.shape == two.shape == (2, 1, 32, 32)
    assert torch.allclose(one, two, rtol=0, atol=1e-9), (one - two).abs().max()
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # run.json for a --resume; the batch files (written by the first shard only) removed at the end
    assert (tmp_path / "two" / "run.json").is_file() and not (tmp_path / "two" / "batches").exists()
    assert metrics["iterations"] < 7                    # stopped on tol, on both shards at once
    assert metrics["x0_rmse_vs_sequential"] < 1e-2      # and the DEQ's x_0 is the sequential chain's
