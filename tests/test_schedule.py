"""Schedules, timestep subsequences and the sequential samplers (the oracles)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import (alphas_cumprod, chain_alphas, cosine_betas, ddim_sigmas,
                                       fixed_point_coefficients, linear_betas, make_betas,
                                       timestep_sequence)
from deqlit.diffusion.sequential import ddim_sample, ddpm_sample
from tests.conftest import GaussianDataNoise

BETAS = linear_betas()
ABAR = alphas_cumprod(BETAS)


def test_linear_schedule_matches_ddpm():
    assert BETAS.shape == (1000,) and BETAS[0] == 1e-4 and abs(float(BETAS[-1]) - 0.02) < 1e-12
    assert torch.all(ABAR[1:] < ABAR[:-1])
    assert abs(float(ABAR[-1]) - 4.036e-5) < 1e-7      # DDPM's abar_999


def test_cosine_schedule_is_clipped_and_decreasing():
    betas = cosine_betas()
    assert betas.max() <= 0.999 and betas.min() > 0
    assert torch.all(alphas_cumprod(betas)[1:] < alphas_cumprod(betas)[:-1])
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("sigmoid")


def test_uniform_and_quad_sequences_follow_the_reference_formulas():
    assert timestep_sequence(10) == list(range(0, 1000, 100))
    assert len(timestep_sequence(30)) == 30                      # reference gives 31 here
    quad = timestep_sequence(10, skip="quad")
    expected = [int(v) for v in (torch.linspace(0, math.sqrt(800), 10, dtype=torch.float64) ** 2)]
    assert quad == expected and quad[-1] == 800


def test_quad_with_1000_steps_drops_its_repeated_timesteps_with_a_warning():
    with pytest.warns(UserWarning, match="688 steps"):
        seq = timestep_sequence(1000, skip="quad")
    assert len(seq) == 688 and seq == sorted(set(seq)) and seq[-1] == 800
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(timestep_sequence(1000, skip="quad", dedupe=False)) == 1000


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_dropping_repeated_timesteps_does_not_change_the_chain(eta):
    """Steps between equal timesteps are the identity, so dropping them gives the same x_0."""
    model = GaussianDataNoise()
    full = timestep_sequence(100, skip="quad", dedupe=False)
    with pytest.warns(UserWarning):
        distinct = timestep_sequence(100, skip="quad")
    assert len(distinct) < len(full)
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    # The same noise for the steps that both chains take; the identity steps get none (sigma = 0).
    noise_full = torch.randn(len(full), 2, 1, 8, 8, dtype=torch.float64)
    # Noise row k is used by the step out of the state at timestep full[k] into full[k-1]; only
    # the first state of each run of equal timesteps takes a real step.
    keep = [k for k in range(len(full)) if k == 0 or full[k - 1] != full[k]]
    with torch.no_grad():
        a = ddim_sample(model, x_T, Chain.from_sequence(ABAR, full, eta), noise=noise_full)
        b = ddim_sample(model, x_T, Chain.from_sequence(ABAR, distinct, eta), noise=noise_full[keep])
    assert torch.allclose(a, b, atol=1e-10)


def test_sigma_with_eta_one_is_the_ddpm_posterior_variance():
    seq = list(range(1000))
    sig = ddim_sigmas(chain_alphas(ABAR, seq), 1.0)
    posterior = BETAS[1:] * (1 - ABAR[:-1]) / (1 - ABAR[1:])
    assert torch.allclose(sig[1:] ** 2, posterior, rtol=1e-10)
    assert sig[0] == 0                                   # the last step to x_0 adds no noise
    assert torch.all(ddim_sigmas(chain_alphas(ABAR, seq), 0.0) == 0)
    with pytest.raises(ValueError):
        ddim_sigmas(chain_alphas(ABAR, seq), -0.1)


def test_ddpm_sampler_equals_ddim_with_eta_one_on_the_full_chain():
    model = GaussianDataNoise()
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn(1000, 2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a = ddpm_sample(model, x_T, BETAS, noise=noise)
        b = ddim_sample(model, x_T, Chain.from_sequence(ABAR, list(range(1000)), 1.0), noise=noise)
    assert torch.allclose(a, b, atol=1e-8)


def test_fixed_point_coefficients_reproduce_one_ddim_step():
    """y_{i-1} = y_i + c_i eps + d_i xi equals the predict-x0 form of the DDIM step."""
    seq = timestep_sequence(10)
    chain = chain_alphas(ABAR, seq)
    sig = ddim_sigmas(chain, 0.3)
    c, d = fixed_point_coefficients(chain, sig)
    x, eps, xi = torch.randn(3, 5, dtype=torch.float64)
    for i in range(1, 11):
        a, ap = chain[i], chain[i - 1]
        step = ap.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt() + (1 - ap - sig[i - 1] ** 2).sqrt() * eps + sig[i - 1] * xi
        scaled = x / a.sqrt() + c[i - 1] * eps + d[i - 1] * xi
        assert torch.allclose(step / ap.sqrt(), scaled, atol=1e-10)
