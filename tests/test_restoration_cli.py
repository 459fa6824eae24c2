"""invert.py --task inpaint / super-resolution as a user runs it: the method and start it picks,
the restoration scores of metrics.json recomputed by hand, the grid's columns, the clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.tiny import exact_config, tiny_setup




def invert(config: Path, out: Path, *extra: str) -> dict:
    from deqlit.commands.invert import main
    return main(["--config", str(config), "--no-progress", "--out", str(out), *extra])


def hand_psnr(x: torch.Tensor, target: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / (x - target).pow(2).mean()))


def test_inpaint_center_runs_deq_and_reports_the_hole_psnr(tmp_path, capsys):
    config = exact_config(tmp_path, n_images=3)
    metrics = invert(config, tmp_path / "inp", "--task", "inpaint", "--mask", "center")
    said = capsys.readouterr().out
    assert "--task inpaint: running the DEQ gradient method" in said and "--init ddim-inversion" in said
    assert metrics["settings"]["method"] == "deq" and metrics["settings"]["init"] == "ddim-inversion"
    saved = json.loads((tmp_path / "inp" / "metrics.json").read_text())
    latents = torch.load(tmp_path / "inp" / "latents.pt", weights_only=True)
    targets, restored = latents["targets"], latents["restored"]
    hole = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    hole[..., 2:6, 2:6] = True                       # the centred 4x4 square: 25% of 8x8
    assert torch.equal(latents["unknown"], hole.expand(3, 1, 8, 8))
    # The known pixels are the target's; the hidden ones are what the chain made of the latent.
    assert torch.equal(restored[~hole.expand_as(restored)], targets[~hole.expand_as(targets)])
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.sequential import ddim_sample
    from deqlit.models.build import build_noise_model
    model, _, _ = build_noise_model(yaml.safe_load(config.read_text()))
    with torch.no_grad():
        x0 = ddim_sample(model.eval(), latents["x_T"], Chain.from_dict(latents["chain"]))
    assert torch.allclose(restored[hole.expand_as(restored)], x0[hole.expand_as(x0)], atol=1e-5)
    for b, image in enumerate(saved["images"]):
        inside = hole[0].expand_as(targets[b])
        by_hand = hand_psnr(restored[b][inside].clamp(-1, 1), targets[b][inside])
        assert image["hole_psnr"] == pytest.approx(by_hand, abs=1e-4)
        assert image["restored_psnr"] == pytest.approx(hand_psnr(restored[b].clamp(-1, 1), targets[b]), abs=1e-4)
        for key in ("hole_ssim", "restored_ssim", "input_hole_psnr", "initial_hole_psnr",
                    "latent_autocorrelation", "latent_kurtosis"):
            assert isinstance(image[key], float), key
    mean = sum(m["hole_psnr"] for m in saved["images"]) / 3
    assert saved["mean_hole_psnr"] == pytest.approx(mean) and saved["mean_restored_ssim"] is not None


def test_super_resolution_keeps_the_low_resolution_image(tmp_path, capsys):
    config = exact_config(tmp_path, n_images=3)
    metrics = invert(config, tmp_path / "sr", "--task", "super-resolution", "--factor", "2")
    assert "--init exact" in capsys.readouterr().out
    assert metrics["settings"]["method"] == "deq" and metrics["settings"]["task"] == "super-resolution"
    latents = torch.load(tmp_path / "sr" / "latents.pt", weights_only=True)
    pooled = F.avg_pool2d(latents["restored"], 2)
    assert torch.allclose(pooled, F.avg_pool2d(latents["targets"], 2), atol=1e-5)
    assert latents["unknown"] is None and "hole_psnr" not in metrics["images"][0]
    by_hand = hand_psnr(latents["restored"][0].clamp(-1, 1), latents["targets"][0])
    assert metrics["images"][0]["restored_psnr"] == pytest.approx(by_hand, abs=1e-4)


def test_the_users_method_and_init_are_kept(tmp_path, capsys):
    config = exact_config(tmp_path, n_images=3)
    metrics = invert(config, tmp_path / "kept", "--task", "inpaint", "--method", "baseline",
                     "--inversion.init", "gaussian", "--num-images", "1", "--max-steps", "1")
    assert "DEQ" not in capsys.readouterr().out
    assert metrics["settings"]["method"] == "baseline" and metrics["settings"]["init"] == "gaussian"


def test_a_factor_that_does_not_divide_the_images_and_exact_inpainting_are_refused(tmp_path):
    config = exact_config(tmp_path, n_images=3)
    with pytest.raises(ValueError, match=r"--factor 3 does not divide the 8x8 images.*--factor 2"):
        invert(config, tmp_path / "f3", "--task", "super-resolution", "--factor", "3")
    assert not (tmp_path / "f3").exists()                   # refused before anything is written
    with pytest.raises(ValueError, match="exact inversion inverts whole images: use --method deq"):
        invert(config, tmp_path / "ex", "--method", "exact", "--task", "inpaint")
    assert not (tmp_path / "ex").exists()


def test_the_grid_of_a_restoration_shows_the_degraded_input_and_the_restored_image(tmp_path):
    from deqlit.lit.inversion_figures import COLUMNS, RESTORATION_COLUMNS, grid_inputs
    from deqlit.lit.inversion_outputs import load_parts
    config = exact_config(tmp_path, n_images=3)
    invert(config, tmp_path / "inp", "--task", "inpaint", "--num-images", "2", "--max-steps", "1")
    part = load_parts(tmp_path / "inp" / "latents")[0]
    grid = grid_inputs(part, part["metrics"], "deq", 4)
    assert grid["columns"] == RESTORATION_COLUMNS != COLUMNS
    assert torch.equal(grid["initial"], part["observed_shown"]) and torch.equal(grid["final"], part["restored"])
    assert grid["final_psnr"] == [m["hole_psnr"] for m in part["metrics"]]
    shown_hole = part["observed_shown"][0, :, 2:6, 2:6]
    assert float(shown_hole.std()) == 0.0                   # the mean fill: the hole shows flat
    part.pop("task")                                         # a reconstruction's batch result
    assert grid_inputs(part, part["metrics"], "deq", 4).get("columns", COLUMNS) == COLUMNS


def test_print_config_shows_the_method_and_start_a_restoration_runs(tmp_path, capsys):
    """--print_config prints what the run would use: deq from DDIM inversion, not the config's exact."""
    from deqlit.commands.invert import main
    config = tiny_setup(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(config), "--task", "inpaint", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert stop.value.code == 0
    assert (printed["inversion"]["method"], printed["inversion"]["init"]) == ("deq", "ddim-inversion")


def test_a_restoration_takes_few_steps_unless_asked(tmp_path, capsys):
    """More steps fit the known pixels and degrade the hole: without --max-steps a restoration runs
    RESTORATION_STEPS (as --print_config shows); --max-steps and --inversion.max_steps are kept."""
    from deqlit.commands.invert import RESTORATION_STEPS, main
    for extra, steps in (([], RESTORATION_STEPS), (["--max-steps", "7"], 7),
                         (["--inversion.max_steps", "8"], 8)):      # faces.yaml: max_steps 25
        with pytest.raises(SystemExit):
            main(["--task", "inpaint", "--print_config", *extra])
        printed = capsys.readouterr().out
        assert yaml.safe_load(printed)["inversion"]["max_steps"] == steps, extra
