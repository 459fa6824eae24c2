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
