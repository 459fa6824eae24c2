"""The shifted warm start (deq/warm_start.py) against the plain reuse of the previous solution."""
from __future__ import annotations

import pytest
import torch

from deqlit.diffusion.chain import Chain
from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.layer import DEQSampler
from deqlit.deq.warm_start import flow_ratios, shifted_warm_start
from deqlit.diffusion.schedule import alphas_cumprod, chain_alphas, linear_betas, timestep_sequence
from tests.conftest import GaussianDataNoise

ABAR = alphas_cumprod(linear_betas())


def first_residual(net, seq, x_T, X0) -> float:
    fx = FixedPointMap(net, Chain.from_sequence(ABAR, seq)).bind(x_T)(X0)
    return float((fx - X0).norm() / fx.norm())


def test_flow_ratios_run_from_data_scale_to_one():
    chain = chain_alphas(ABAR, timestep_sequence(100))
    ratio = flow_ratios(chain, 0.25)
    assert ratio.shape == (100,)
    assert torch.all(ratio[1:] >= ratio[:-1])                    # grows towards x_T
    assert ratio[0] == pytest.approx(0.5, rel=1e-3)               # sigma_0 = s, sigma_T ~ 1
    assert ratio[-1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_shifted_start_is_closer_to_the_new_fixed_point_than_the_old_solution(weight):
    """x_T moves by a small step (as Adam moves it); the new solve starts from the old solution,
    plain or shifted. For exactly Gaussian data (weight 0) the shift is nearly the exact answer."""
    T = 50
    seq = timestep_sequence(T)
    net = GaussianDataNoise(weight=weight, std=0.5, dtype=torch.float64).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_T_new = x_T + 0.01 * torch.randn(x_T.shape, generator=gen, dtype=torch.float64)
    exact = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), "picard", dict(max_iter=T, tol=0.0))
    with torch.no_grad():
        X_old, _ = exact(x_T)
        X_new, _ = exact(x_T_new)
        shifted = shifted_warm_start(X_old, x_T, x_T_new, chain_alphas(ABAR, seq), 0.25)
        plain_error = (X_old - X_new).norm()
        shifted_error = (shifted - X_new).norm()
        plain_res = first_residual(net, seq, x_T_new, X_old)
        shifted_res = first_residual(net, seq, x_T_new, shifted)
    assert shifted_error < plain_error
    assert shifted_res < plain_res / 1.5
    if weight == 0.0:
        assert shifted_res < plain_res / 10
        assert shifted_error < 0.05 * plain_error


def test_shifted_start_needs_fewer_solver_iterations():
    T = 50
    seq = timestep_sequence(T)
    net = GaussianDataNoise(weight=0.3, dtype=torch.float64).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_T_new = x_T + 0.01 * torch.randn(x_T.shape, generator=gen, dtype=torch.float64)
    layer = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), "triangular-anderson", dict(max_iter=T, tol=1e-4, m=3))
    with torch.no_grad():
        X_old, _ = layer(x_T)
        _, plain = layer(x_T_new, init=X_old)
        _, shifted = layer(x_T_new, init=shifted_warm_start(X_old, x_T, x_T_new, chain_alphas(ABAR, seq), 0.25))
    assert shifted.iterations < plain.iterations
