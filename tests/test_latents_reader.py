"""The one latents reader (runs/latents.py) and what reads through it: sample.py --latents and
sample.py --interpolate, on a file, a run folder, a run of part files only, and the first rows."""
from __future__ import annotations

import json

import pytest
import torch

from deqlit.commands.invert import main as invert_main
from deqlit.commands.sample import main as sample_main
from deqlit.guards import UserInputError
from deqlit.runs.latents import read_latents
from tests.tiny import tiny_setup


@pytest.fixture(scope="module")
def inverted(tmp_path_factory):
    """A tiny inversion of 5 images in batches of 2: three part files and their merge."""
    tmp = tmp_path_factory.mktemp("latents")
    config = tiny_setup(tmp)
    invert_main(["--config", str(config), "--no-progress", "--inversion.eta", "0.5"])
    return config, tmp / "run"


def test_a_folder_of_parts_reads_as_its_merged_file_and_limit_takes_the_first_rows(inverted, tmp_path):
    _, run = inverted
    merged = torch.load(run / "latents.pt", weights_only=True)
    assert len(list((run / "latents").glob("part-*.pt"))) == 3
    whole = read_latents(run)                       # the folder: its part files
    assert whole["indices"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(whole["x_T"], merged["x_T"]) and torch.equal(whole["noise"], merged["noise"])
    assert whole["chain"] == merged["chain"]
    first = read_latents(run, limit=3)              # stops after the part that holds row 3
    assert first["indices"].tolist() == [0, 1, 2] and first["noise"].shape[1] == 3
    assert torch.equal(first["x_T"], merged["x_T"][:3]) and torch.equal(first["noise"], merged["noise"][:, :3])
    assert torch.equal(read_latents(run / "latents.pt", limit=2)["x_T"], merged["x_T"][:2])
    with pytest.raises(FileNotFoundError, match="neither latents.pt nor latents/part"):
        read_latents(tmp_path)


def test_sample_regenerates_the_first_images_of_a_run_folder_without_its_merged_file(inverted, tmp_path):
    config, run = inverted
    parts_only = tmp_path / "parts-only"
    (parts_only / "latents").mkdir(parents=True)
    for part in (run / "latents").glob("part-*.pt"):
        (parts_only / "latents" / part.name).write_bytes(part.read_bytes())
    out = tmp_path / "regen"
    metrics = sample_main(["--config", str(config), "--latents", str(parts_only), "--num-images", "3",
                           "--solver", "sequential", "--out", str(out), "--no-progress"])
    assert metrics["num_images"] == 3
    saved = read_latents(run, limit=3)["reconstructions"]
    x0 = torch.load(out / "samples.pt", weights_only=True)["x0"]
    assert torch.allclose(x0, saved.float(), atol=1e-4)   # the same chain, x_T and noise


def test_interpolate_flag_writes_a_strip_per_pair_and_the_gaussianity(inverted, tmp_path):
    config, run = inverted
    eta0 = tmp_path / "eta0"
    invert_main(["--config", str(config), "--no-progress", "--out", str(eta0), "--num-images", "4"])
    out = tmp_path / "interp"
    report = sample_main(["--config", str(config), "--interpolate", str(eta0), "--pairs", "0:1,2:3",
                          "--frames", "5", "--out", str(out), "--solver", "sequential"])
    assert (out / "strip_0_1.png").is_file() and (out / "strip_2_3.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert [p["rows"] for p in saved["pairs"]] == [[0, 1], [2, 3]]
    assert len(saved["pairs"][0]["lag1_autocorrelation"]) == 5 == report["frames"]
    assert saved["interpolated"]["count"] == 2 * 3              # the inner frames of both pairs
    with pytest.raises(ValueError, match="eta"):                # noise has no path between latents
        sample_main(["--config", str(config), "--interpolate", str(run), "--out", str(tmp_path / "x")])


def test_latents_holding_nan_are_refused_naming_their_dataset_indices(inverted, tmp_path, capsys):
    """A file with NaN rows (a diverged run's) stops sample.py --latents / --interpolate with one
    line naming the images, not with the solver's 'starting point holds NaN/Inf' mid-run."""
    config, run = inverted
    data = torch.load(run / "latents.pt", weights_only=True)
    data["x_T"][1, 0, 0, 0] = float("nan")
    data["x_T"][3] = float("inf")
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    with pytest.raises(UserInputError, match=r"NaN/Inf for 2 of 5 image\(s\) \(dataset indices 1, 3\)"):
        read_latents(bad)
    assert torch.isfinite(read_latents(bad, limit=1)["x_T"]).all()     # the rows before them still read
    from deqlit.cli import run_main
    for flag in ("--latents", "--interpolate"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            run_main(sample_main, ["--config", str(config), flag, str(bad), "--no-progress",
                                   "--out", str(tmp_path / flag.strip("-"))], script="sample.py")
        err = capsys.readouterr().err
        assert stop.value.code != 0 and "dataset indices 1, 3" in err and "Traceback" not in err
        assert not (tmp_path / flag.strip("-")).exists()
