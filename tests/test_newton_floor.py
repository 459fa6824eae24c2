"""bench/newton_floor.py: exact Newton on the chain (the floor of newton-scan's Jacobian model)."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def floor():
    return load_script("bench/newton_floor.py", "newton_floor")


def setup(weight: float, T: int = 10):
    from deqlit.diffusion.chain import Chain
    from deqlit.diffusion.schedule import timestep_sequence
    from deqlit.diffusion.sequential import ddim_sample
    from tests.conftest import GaussianDataNoise
    model = GaussianDataNoise(weight=weight)
    seq = timestep_sequence(T)
    chain = Chain.from_sequence(model.abar, seq)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ref = ddim_sample(model, x_T, chain)
    return model, chain, seq, x_T, ref


def test_exact_newton_solves_a_linear_network_in_one_step(floor):
    """eps linear in x (exact Gaussian data): one Newton step with the true Jacobian lands on the
    fixed point, so the second call already reproduces sequential DDIM. newton-scan's measured
    table is that Jacobian (a per-row filter, measured exactly by central differences on a linear
    network) and does the same; the scalar secant model starts from the pure-noise gain, which is
    not this network's, and needs more."""
    model, chain, seq, x_T, ref = setup(weight=0.0)
    assert floor.exact_newton_iterations(model, chain, seq, x_T, ref, chain.T) == 2
    assert floor.newton_scan_iterations(model, chain, x_T, ref, chain.T) == 2
    assert floor.newton_scan_iterations(model, chain, x_T, ref, chain.T, jacobian="scalar") > 2


def test_exact_newton_needs_no_more_calls_than_newton_scan_on_a_nonlinear_network(floor):
    model, chain, seq, x_T, ref = setup(weight=0.3)
    exact = floor.exact_newton_iterations(model, chain, seq, x_T, ref, chain.T)
    assert 2 < exact <= floor.newton_scan_iterations(model, chain, x_T, ref, chain.T) < chain.T
