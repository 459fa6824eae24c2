"""sample.py's seams found by a second new-user audit: metrics under several processes, what
--resume compares, damaged latents, the process layout, float64 samples, the run's config.yaml
and the messages that name a fix. Each runs in-process on the shipped model, shrunk."""
from __future__ import annotations

import json

import pytest
import torch

from deqlit.commands.sample import main
from deqlit.guards import OutputFolderError, UserInputError
from tests.test_sample_cli import tiny_latents

TINY = ["--timesteps", "4", "--num-images", "2", "--no-progress", "--trainer.accelerator", "cpu"]


def unfinished(folder) -> None:
    """Make a finished run look stopped before its end: run.json stays, the results go."""
    for name in ("samples.pt", "samples.png", "metrics.json"):
        (folder / name).unlink(missing_ok=True)


# ---- 1. metrics are computed on rank 0 alone --------------------------------------------------
def test_metrics_of_gathered_samples_never_sync_across_processes(tmp_path, monkeypatch):
    """Rank 0 holds every sample (gathered) while the other processes have returned: a
    torchmetrics sync in compute() would wait on them ("rank 1 closed its connection"). Here the
    metrics believe they run among several processes and any gather fails."""
    import torchmetrics.metric

    def no_gather(*args, **kwargs):
        raise AssertionError("compute() gathered across processes")
    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", no_gather)
    metrics = main([*TINY, "--metrics", "fd-random", "--out", str(tmp_path / "o")])
    assert metrics["fd-random"] >= 0 and (tmp_path / "o" / "samples.pt").is_file()


# ---- 2. and 8. what --resume compares ---------------------------------------------------------
def test_resume_refuses_another_autocast_precision_and_metrics_record_it(tmp_path):
    """bf16-mixed and 32-true both hold float32 parameters: the precision itself is compared."""
    out = tmp_path / "o"
    metrics = main([*TINY, "--trainer.precision", "bf16-mixed", "--out", str(out)])
    assert metrics["precision"] == "bf16-mixed"
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16-mixed"
    unfinished(out)
    with pytest.raises(OutputFolderError, match=r"precision \(saved 'bf16-mixed', now '32-true'\)"):
        main([*TINY, "--trainer.precision", "32-true", "--out", str(out), "--resume"])


def test_resume_accepts_a_typed_default_solver_option(tmp_path):
    """--sampling.jacobian table is newton-scan's default: typing it changes nothing."""
    out = tmp_path / "o"
    common = [*TINY, "--solver", "newton-scan", "--out", str(out)]
    main(common)
    assert json.loads((out / "run.json").read_text())["solver_options"]["jacobian"] == "table"
    unfinished(out)
    assert main(common + ["--sampling.jacobian", "table", "--resume"])["num_images"] == 2


# ---- 3. damaged latents -----------------------------------------------------------------------
def test_a_garbled_or_truncated_latents_file_is_one_error_naming_it(tmp_path):
    garbled = tmp_path / "c.pt"
    garbled.write_text("x\n")
    real = tiny_latents(tmp_path / "inv", count=2)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    for path in (garbled, cut):
        for flag in ("--latents", "--interpolate"):
            with pytest.raises(UserInputError, match=f"latents file {path} is corrupt or truncated"):
                main([flag, str(path), "--no-progress", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_corrupt_part_file_under_latents_run_says_how_to_mend_the_inversion(tmp_path):
    run = tmp_path / "inv"
    (run / "latents").mkdir(parents=True)
    (run / "latents" / "part-000000.pt").write_text("x\n")
    with pytest.raises(UserInputError, match="part-000000.pt is corrupt or truncated") as caught:
        main(["--latents", str(run), "--no-progress", "--out", str(tmp_path / "o")])
    assert "cannot resume" not in str(caught.value) and "invert.py --resume" in str(caught.value)


# ---- 4. the process layout --------------------------------------------------------------------
class Started(Exception):
    """Raised in place of starting the processes: the launch sample.py asked for."""


@pytest.mark.parametrize("strategy", [["--trainer.strategy", "ddp"], []])
def test_two_devices_sample_data_parallel_on_the_time_mesh(tmp_path, monkeypatch, strategy):
    """ddp (or the default strategy) over 2 devices: the ddp_time mesh with one time shard,
    two data replicas, not one silent process."""
    import deqlit.commands.sample as command

    def capture(launch, device):
        raise Started(launch)
    monkeypatch.setattr(command, "process_mesh", capture)
    with pytest.raises(Started) as started:
        main([*TINY, "--trainer.devices", "2", *strategy, "--out", str(tmp_path / "o")])
    launch = started.value.args[0]
    assert launch.time_sharded and launch.shards == 1


def test_a_strategy_sample_py_cannot_run_and_multi_process_interpolation_are_refused(tmp_path, monkeypatch):
    import deqlit.commands.sample as command
    monkeypatch.setattr(command, "process_mesh", lambda *a: pytest.fail("processes started"))
    with pytest.raises(UserInputError, match="cannot run --trainer.strategy fsdp: use ddp"):
        main([*TINY, "--trainer.devices", "2", "--trainer.strategy", "fsdp", "--out", str(tmp_path / "o")])
    latents = str(tiny_latents(tmp_path / "inv"))
    with pytest.raises(UserInputError, match="--interpolate runs in one process: drop --trainer.strategy "
                                             "ddp and --trainer.devices 2"):
        main(["--interpolate", latents, "--trainer.devices", "2", "--trainer.strategy", "ddp",
              "--out", str(tmp_path / "m")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


# ---- 5. float64 samples -----------------------------------------------------------------------
def test_64_true_keeps_float64_samples(tmp_path):
    metrics = main([*TINY, "--trainer.precision", "64-true", "--compare-sequential", "--out", str(tmp_path)])
    assert torch.load(tmp_path / "samples.pt", weights_only=True)["x0"].dtype == torch.float64
    assert metrics["x0_rmse_vs_sequential"] < 1e-10         # float64 against float64, not float32


# ---- 6. more images than the latents hold -----------------------------------------------------
def test_more_num_images_than_the_latents_hold_is_refused(tmp_path):
    latents = str(tiny_latents(tmp_path / "inv", count=2))
    with pytest.raises(UserInputError, match=f"--num-images 5 .* {latents} holds \\(2\\)"):
        main(["--latents", latents, "--num-images", "5", "--no-progress", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ---- 7. config.yaml in every run folder -------------------------------------------------------
def test_the_run_folder_holds_its_config_which_replays_it(tmp_path):
    out = tmp_path / "o"
    main([*TINY, "--seed", "7", "--out", str(out)])
    assert (out / "config.yaml").is_file()
    replay = main(["--config", str(out / "config.yaml"), "--no-progress", "--out", str(tmp_path / "r")])
    first = torch.load(out / "samples.pt", weights_only=True)["x0"]
    assert replay["seed"] == 7 and torch.equal(torch.load(tmp_path / "r" / "samples.pt", weights_only=True)["x0"], first)
    unfinished(out)
    before = (out / "config.yaml").stat().st_mtime_ns
    main([*TINY, "--seed", "7", "--out", str(out), "--resume"])
    assert (out / "config.yaml").stat().st_mtime_ns == before        # the run's start is kept
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.yaml").write_text("{}\n")
    with pytest.raises(OutputFolderError, match=r"config.yaml\), which this run would overwrite"):
        main([*TINY, "--out", str(tmp_path / "c")])
    latents = str(tiny_latents(tmp_path / "inv"))
    main(["--interpolate", latents, "--frames", "3", "--solver", "sequential", "--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / "config.yaml").is_file()


# ---- 9. messages ------------------------------------------------------------------------------
def test_an_inversion_folder_is_refused_without_suggesting_resume(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"settings": {}, "chain": {}, "checkpoint": "x"}))
    with pytest.raises(OutputFolderError) as caught:
        main([*TINY, "--out", str(tmp_path)])
    assert "--resume" not in str(caught.value)


def test_resuming_with_another_process_layout_names_the_flags(tmp_path):
    out = tmp_path / "o"
    main([*TINY, "--out", str(out)])
    identity = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**identity, "data_replicas": 2}))
    unfinished(out)
    with pytest.raises(OutputFolderError, match="data_replicas .*start it with the same --trainer.devices "
                                                "/ --parallel.time_shards"):
        main([*TINY, "--out", str(out), "--resume"])


def test_listed_cuts_long_values():
    from deqlit.runs.resume import listed
    line = listed([("chain.abar", [0.1234567] * 50, [0.2] * 50), ("seed", 0, 1)])
    assert "..." in line and len(line) < 200 and "seed (saved 0, now 1)" in line


def test_a_typed_option_of_another_solver_is_refused_by_name(tmp_path):
    """--sampling.jacobian is newton-scan's: with --solver picard it would be ignored (and recorded
    in metrics.json as if used). The config file's list of every solver's options is never refused."""
    from deqlit.guards import UserInputError
    with pytest.raises(UserInputError, match=r"--sampling.jacobian would do nothing with --solver picard: "
                                             r"--sampling.jacobian applies to --solver newton-scan"):
        main(["--solver", "picard", "--sampling.jacobian", "scalar", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
