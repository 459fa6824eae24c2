"""The Chain object: one owner of the timesteps, serialized with every latents file, so saved
latents regenerate their images exactly (the cifar10 config's T = 100 quad de-duplicates to 96
steps; rebuilding '96 quad steps' would give 93 other ones)."""
from __future__ import annotations

import pytest
import torch

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas, timestep_sequence
from tests.tiny import tiny_setup

ABAR = alphas_cumprod(linear_betas())


def test_quad_100_keeps_its_96_steps_through_a_round_trip():
    with pytest.warns(UserWarning, match="96 steps"):
        chain = Chain.build(ABAR, 100, "quad")
    assert chain.T == 96 and chain.requested == 100
    again = Chain.from_dict(chain.to_dict())
    assert again == chain and again.timesteps == chain.timesteps
    assert torch.equal(again.c, chain.c) and torch.equal(again.sigmas, chain.sigmas)
    rebuilt = timestep_sequence(96, 1000, "quad")        # what counting steps would rebuild
    assert tuple(rebuilt) != chain.timesteps


def test_chain_checks_its_inputs_and_the_model_schedule():
    with pytest.raises(ValueError, match="eta"):
        Chain.build(ABAR, 10, eta=float("nan"))
    with pytest.raises(ValueError, match="increase"):
        Chain.from_sequence(ABAR, [5, 3])
    other = alphas_cumprod(linear_betas(beta_end=0.03))
    with pytest.raises(ValueError, match="schedule"):
        Chain.build(ABAR, 10).check_schedule(other)
    with pytest.raises(ValueError, match="not a saved chain"):
        Chain.from_dict({"eta": 0.0})


@pytest.mark.slow
@pytest.mark.parametrize("timesteps,skip,eta", [(5, "uniform", 0.0), (7, "quad", 0.5), (100, "quad", 0.0)])
def test_latents_from_invert_regenerate_through_sample_py(tmp_path, timesteps, skip, eta):
    from deqlit.commands.invert import main as invert
    from deqlit.commands.sample import main as sample
    config = tiny_setup(tmp_path, n_images=2)
    invert(["--config", str(config), "--no-progress", "--timesteps", str(timesteps), "--skip", skip,
            "--eta", str(eta), "--max-steps", "1", "--inversion.max_iter", "3"])
    latents = tmp_path / "run" / "latents.pt"
    saved = torch.load(latents, weights_only=True)
    chain = Chain.from_dict(saved["chain"])
    assert (saved["noise"] is not None) == (eta > 0)
    if timesteps == 100:
        assert chain.T == 96
    metrics = sample(["--config", str(config), "--latents", str(latents), "--solver", "sequential",
                      "--out", str(tmp_path / "regen"), "--no-progress"])
    assert metrics["timesteps"] == chain.T and metrics["chain"] == saved["chain"]
    assert metrics["x0_psnr_vs_saved"] > 100          # the same chain, the same noise: exact
    with pytest.raises(ValueError, match="saved in the file"):
        sample(["--config", str(config), "--latents", str(latents), "--timesteps", "9",
                "--out", str(tmp_path / "other")])
