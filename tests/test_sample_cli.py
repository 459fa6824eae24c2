"""sample.py's contract: the files and metrics it promises, on the shipped model, shrunk."""
from __future__ import annotations

import json

import pytest
import torch

from deqlit.commands.sample import main

KEYS = {"solver", "timesteps", "eta", "iterations", "nfe", "final_residual", "seconds", "residual_trace"}


@pytest.mark.parametrize("solver,eta", [("triangular-anderson", 0.0), ("anderson", 0.5)])
def test_sample_writes_grid_and_metrics_matching_the_sequential_chain(tmp_path, solver, eta):
    metrics = main(["--timesteps", "4", "--num-images", "2", "--solver", solver, "--eta", str(eta),
                    "--tol", "1e-6", "--compare-sequential", "--out", str(tmp_path)])
    assert (tmp_path / "samples.png").is_file()
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert KEYS | {"sequential_seconds", "x0_rmse_vs_sequential", "x0_psnr_vs_sequential"} <= set(written)
    assert written["solver"] == solver and written["timesteps"] == 4 and written["eta"] == eta
    assert written["iterations"] <= 4 and len(written["residual_trace"]) == written["iterations"]
    assert written["x0_rmse_vs_sequential"] < 1e-3 and written == metrics


def test_newton_scan_jacobian_override_is_honoured_and_recorded(tmp_path, monkeypatch):
    """--sampling.jacobian scalar reaches the solver (no table measured) and metrics.json records
    the options the solve ran with; the default records jacobian: table."""
    import deqlit.deq.jacobian_table as jacobian_table
    measured = []
    real = jacobian_table.gain_table
    monkeypatch.setattr(jacobian_table, "gain_table", lambda *a: measured.append(1) or real(*a))
    common = ["--timesteps", "4", "--num-images", "1", "--solver", "newton-scan", "--no-progress"]
    scalar = main(common + ["--sampling.jacobian", "scalar", "--out", str(tmp_path / "s")])
    assert scalar["solver_options"]["jacobian"] == "scalar" and not measured
    table = main(common + ["--out", str(tmp_path / "t")])
    assert table["solver_options"]["jacobian"] == "table" and measured
    with pytest.raises(ValueError, match="jacobian must be one of table, scalar"):
        main(common + ["--sampling.jacobian", "diagonal", "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()                 # a failed run leaves nothing


def test_sample_regenerates_latents_and_reports_a_missing_checkpoint(tmp_path):
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
    x_T = torch.randn(2, 1, 32, 32)
    chain = Chain.build(alphas_cumprod(linear_betas()), 3)
    torch.save({"x_T": x_T, "noise": None, "chain": chain.to_dict()}, tmp_path / "latents.pt")
    metrics = main(["--latents", str(tmp_path / "latents.pt"), "--solver", "sequential", "--out", str(tmp_path / "o")])
    assert metrics["timesteps"] == 3 and metrics["num_images"] == 2
    torch.save({"x_T": x_T, "noise": None}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="holds no chain"):
        main(["--latents", str(tmp_path / "old.pt"), "--out", str(tmp_path / "q")])
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        main(["--ckpt", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "p")])


# ---- output folders, interpolation flags, the samples grid (the new-user audit) -----------------
SHRUNK = ["--timesteps", "3", "--no-progress"]


def tiny_latents(folder, count: int = 4, eta: float = 0.0):
    """latents.pt as invert.py writes it, with a 3-step chain, in `folder`."""
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
    folder.mkdir(parents=True, exist_ok=True)
    chain = Chain.build(alphas_cumprod(linear_betas()), 3, eta=eta)
    x_T = torch.randn(count, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, count, 1, 32, 32) if eta > 0 else None
    torch.save({"x_T": x_T, "noise": noise, "chain": chain.to_dict()}, folder / "latents.pt")
    return folder / "latents.pt"


def test_runs_never_share_a_folder_and_a_used_out_is_refused(tmp_path, monkeypatch):
    """Plain samples, slerp and lerp morphs each have a default folder; a second run into a
    folder that holds a sampling or interpolation run's outputs is refused, writing nothing."""
    from deqlit.guards import OutputFolderError
    monkeypatch.chdir(tmp_path)                     # the default folders are relative: runs/...
    latents = str(tiny_latents(tmp_path / "inv"))
    morph = ["--interpolate", latents, "--pairs", "0:1", "--frames", "3", "--solver", "sequential"]
    main(morph)
    main(morph + ["--interp", "lerp"])
    main(["--num-images", "1", *SHRUNK])
    folders = {p.name: json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "runs").iterdir()}
    assert set(folders) == {"interpolate-faces", "interpolate-faces-lerp", "sample-faces"}
    assert folders["interpolate-faces"]["method"] == "slerp" and folders["interpolate-faces-lerp"]["method"] == "lerp"
    assert folders["sample-faces"]["num_images"] == 1
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    for argv in (["--num-images", "1", *SHRUNK], morph,
                 ["--num-images", "1", *SHRUNK, "--out", "runs/interpolate-faces"],
                 morph + ["--out", "runs/sample-faces"]):
        with pytest.raises(OutputFolderError, match="--out NEW_FOLDER"):
            main(argv)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")} == before


@pytest.mark.parametrize("flags", [["--num-images", "2"], ["--metrics", "fd-random"], ["--compare-sequential"],
                                   ["--timesteps", "3"], ["--eta", "0.5"]])
def test_sampling_flags_with_interpolate_are_refused(tmp_path, flags):
    """--interpolate decodes the saved latents with their own chain and reports fd-random itself:
    plain sampling's flags would be ignored, so they are refused by name before anything is written."""
    from deqlit.guards import UserInputError
    latents = str(tiny_latents(tmp_path / "inv"))
    with pytest.raises(UserInputError, match=f"{flags[0]} would do nothing with --interpolate"):
        main(["--interpolate", latents, "--pairs", "0:1", "--no-progress", *flags, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--pairs", "0:1"], ["--interp", "lerp"], ["--frames", "3"]])
def test_interpolation_flags_without_interpolate_are_refused(tmp_path, flags):
    from deqlit.guards import UserInputError
    with pytest.raises(UserInputError, match=f"{flags[0]} .*--interpolate"):
        main(["--num-images", "1", *SHRUNK, *flags, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_samples_png_is_a_labelled_upscaled_grid(tmp_path):
    """Every sample upscaled (nearest) to >= 96 px, its index under it, and a title that names
    the solver, T and how the solve ended."""
    from PIL import Image

    from deqlit.commands.sample import samples_title
    from deqlit.deq.solvers import SolverStats
    from deqlit.diffusion.chain import Chain
    metrics = main(["--num-images", "3", *SHRUNK, "--solver", "sequential", "--compare-sequential",
                    "--out", str(tmp_path)])
    x0 = torch.load(tmp_path / "samples.pt", weights_only=True)["x0"]
    for name in ("samples.png", "samples_sequential.png"):
        picture = torch.tensor(list(Image.open(tmp_path / name).convert("L").getdata()), dtype=torch.float32)
        width, height = Image.open(tmp_path / name).size
        picture = picture.reshape(height, width)
        assert width >= 2 * 96 and height >= 2 * 96      # 3 images: 2 columns, 2 rows of tiles
        # Find the first tile: the upscaled image 0 appears somewhere below the title.
        tile = ((x0[0, 0].clamp(-1, 1) + 1) * 127.5).round().repeat_interleave(3, 0).repeat_interleave(3, 1)
        found = [(y, x) for y in range(0, 60) for x in range(0, 20)
                 if torch.equal(picture[y:y + 96, x:x + 96], tile)]
        assert found, name
        y, x = found[0]
        assert (picture[:y] < 128).any()                  # the title above the tiles
        assert (picture[y + 96:y + 112, x:x + 96] < 128).any()   # "#0" under the first tile
    chain = Chain.from_dict(metrics["chain"])
    exact = SolverStats(iterations=3, converged=True, rel_residual=[1e-2], exact_by_depth=True)
    assert samples_title("sequential", chain, exact, 1e-3, 3) == (
        "3 samples: sequential, T = 3\nexact after T = 3 iterations (triangular chain; last update's "
        "residual 1.00e-02)")
    loose = SolverStats(iterations=100, converged=False, rel_residual=[2.5e-2])
    assert samples_title("picard", chain.with_eta(0.5), loose, 1e-3, 300) == (
        "samples #0-#255 of 300 (all in samples.pt): picard, T = 3, eta = 0.5\n"
        "NOT converged: residual 2.50e-02 >= tol 0.001 after 100 iterations")


@pytest.mark.parametrize("flags", [["--pairs", "0:99"], ["--pairs", "0-1"], ["--pairs", "0:0"],
                                   ["--pairs", "0:1,0:1"]])
def test_a_refused_interpolation_leaves_no_folder(tmp_path, flags):
    latents = str(tiny_latents(tmp_path / "inv"))
    with pytest.raises(ValueError, match="--pairs"):
        main(["--interpolate", latents, *flags, "--out", str(tmp_path / "o" / "deeper")])
    assert not (tmp_path / "o").exists()
    noisy = str(tiny_latents(tmp_path / "noisy", eta=0.5))
    with pytest.raises(ValueError, match="eta = 0.5"):
        main(["--interpolate", noisy, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_folder_in_use_by_another_run_is_refused_and_the_lock_is_let_go(tmp_path):
    """sample.py (and --interpolate) lock their folder as invert.py and train.py do: a second run on
    a folder in use is refused naming the holder; after a run the folder holds no .lock."""
    from deqlit.guards import OutputFolderError
    from deqlit.runs.folder_lock import LOCK_NAME, folder_lock
    busy = tmp_path / "busy"
    busy.mkdir()
    latents = str(tiny_latents(tmp_path / "inv"))
    with folder_lock(busy, "sample.py --num-images 64"):
        for argv in (["--num-images", "1", *SHRUNK],
                     ["--interpolate", latents, "--frames", "3", "--solver", "sequential"]):
            with pytest.raises(OutputFolderError, match=r"in use by sample.py --num-images 64 \(pid"):
                main(argv + ["--out", str(busy)])
        assert [p.name for p in busy.iterdir()] == [LOCK_NAME]       # nothing written beside it
    metrics = main(["--num-images", "1", *SHRUNK, "--out", str(busy)])
    assert metrics["num_images"] == 1 and not (busy / LOCK_NAME).exists()
    assert (busy / "samples.png").is_file()


def test_a_run_that_fails_after_creating_its_folder_removes_it(tmp_path, monkeypatch):
    import deqlit.commands.sample as command

    def failing(*args, **kwargs):
        raise RuntimeError("the solve failed")
    monkeypatch.setattr(command, "generate", failing)
    with pytest.raises(RuntimeError, match="the solve failed"):
        main(["--num-images", "1", *SHRUNK, "--out", str(tmp_path / "new" / "deeper")])
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()                       # a folder that was there stays
    with pytest.raises(RuntimeError):
        main(["--num-images", "1", *SHRUNK, "--out", str(tmp_path / "kept")])
    assert (tmp_path / "kept").is_dir()


@pytest.mark.parametrize("frames", ["0", "1"])
def test_frames_below_two_get_one_message(tmp_path, frames, capsys):
    latents = str(tiny_latents(tmp_path / "inv"))
    with pytest.raises(SystemExit) as stop:
        main(["--interpolate", latents, "--frames", frames, "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert f"must be 2 or more (the two endpoints are frames), got {frames}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()



def test_batches_of_images_give_the_same_samples_and_one_report(tmp_path):
    """--batch-size solves the images in consecutive batches: the same samples as one solve (every
    image stops on its own), the per-image figures joined in order, recorded in metrics.json."""
    common = ["--timesteps", "4", "--num-images", "3", "--solver", "newton-scan", "--tol", "1e-4",
              "--no-progress"]
    whole = main(common + ["--out", str(tmp_path / "whole")])
    split = main(common + ["--batch-size", "2", "--out", str(tmp_path / "split")])
    assert whole["batch_size"] == 256 and split["batch_size"] == 2
    a = torch.load(tmp_path / "whole" / "samples.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "samples.pt", weights_only=True)
    assert torch.equal(a["x_T"], b["x_T"])
    assert torch.allclose(a["x0"], b["x0"], atol=1e-5)
    assert split["iterations"] <= whole["iterations"] and split["converged"] and whole["converged"]


def test_an_interrupted_run_resumes_from_its_finished_batches(tmp_path, monkeypatch):
    """Ctrl-C after the second of three batches: the run stops saying what it kept; a rerun without
    --resume or with other settings is refused by name; --resume solves only the third batch and
    gives the uninterrupted run's samples, then removes the batch files."""
    import os
    import signal

    import deqlit.runs.sample_batches as batches
    from deqlit.guards import OutputFolderError, RunInterrupted
    common = ["--timesteps", "4", "--num-images", "5", "--batch-size", "2", "--solver", "newton-scan",
              "--tol", "1e-4", "--no-progress"]
    main(common + ["--out", str(tmp_path / "whole")])
    real, saved = batches.save_batch, []

    def save_then_interrupt(folder, index, x0, stats, *replica):
        real(folder, index, x0, stats, *replica)
        saved.append(index)
        if index == 1:
            os.kill(os.getpid(), signal.SIGINT)          # the user's Ctrl-C, right after batch 1
    monkeypatch.setattr(batches, "save_batch", save_then_interrupt)
    part = str(tmp_path / "part")
    with pytest.raises(RunInterrupted, match=r"2 finished batch\(es\) of up to 2 image\(s\) kept in"):
        main(common + ["--out", part])
    assert saved == [0, 1] and not (tmp_path / "part" / "samples.pt").exists()
    with pytest.raises(OutputFolderError, match="or --resume to finish that run"):
        main(common + ["--out", part])
    with pytest.raises(OutputFolderError, match=r"seed \(saved 0, now 1\)"):
        main(common + ["--out", part, "--seed", "1", "--resume"])
    saved.clear()
    metrics = main(common + ["--out", part, "--resume"])
    assert saved == [2] and metrics["num_images"] == 5
    a = torch.load(tmp_path / "whole" / "samples.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "samples.pt", weights_only=True)
    assert torch.allclose(a["x0"], b["x0"], atol=1e-5) and torch.equal(a["x_T"], b["x_T"])
    assert not (tmp_path / "part" / "batches").exists()
    with pytest.raises(OutputFolderError, match="has finished"):
        main(common + ["--out", part, "--resume"])
