"""Exact inversion against its oracles: the sequential DDIM step and chain (predict-x0 form, an
independent formulation), a linear eps whose inverse chain has a closed form, and batch splits."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from deqlit.deq.inverse_map import InverseChainMap, exact_invert
from deqlit.deq.inversion_report import InversionNotConverged
from deqlit.deq.solvers import SolverDivergedError
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.gaussianity import gaussianity, kurtosis, lag1_autocorrelation
from deqlit.diffusion.inverse import (contraction_factors, ddim_inversion_states,
                                    extrapolated_inversion_states)
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_encode, ddim_sample, ddim_step, step_time
from tests.conftest import GaussianDataNoise

ABAR = alphas_cumprod(linear_betas())
SOLVERS = ["picard", "anderson", "triangular-anderson"]
TIGHT = dict(tol=1e-11, max_iter=300)


@pytest.fixture(scope="module")
def net():
    return GaussianDataNoise(dtype=torch.float64)


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(batch, 1, 8, 8, generator=gen, dtype=torch.float64)).clamp(-1, 1)


def fixed_noise(chain: Chain, x0: torch.Tensor, seed: int = 1):
    if chain.eta == 0:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((chain.T,) + tuple(x0.shape), generator=gen, dtype=x0.dtype)


@pytest.mark.parametrize("T,skip,eta", [(10, "uniform", 0.0), (7, "quad", 0.0), (9, "uniform", 0.5)])
def test_each_inverse_step_is_undone_by_one_sequential_ddim_step(net, T, skip, eta):
    """x_i solved from x_{i-1}, pushed through DDIM's own step (predict-x0 form), gives x_{i-1}."""
    chain = Chain.build(ABAR, T, skip, eta)
    x0 = images()
    noise = fixed_noise(chain, x0)
    _, states, report = exact_invert(net, x0, chain, mode="per-step", solver="anderson", noise=noise, **TIGHT)
    assert report.converged and len(report.row_residual) == chain.T
    previous = torch.cat([x0[None], states[:-1]])
    abar, sigmas = chain.abar.tolist(), chain.sigmas.tolist()
    with torch.no_grad():
        for i in range(1, chain.T + 1):
            x = states[i - 1]
            back = ddim_step(x, net(x, step_time(chain, i, x)), abar[i], abar[i - 1], sigmas[i - 1],
                             None if noise is None else noise[i - 1])
            assert (back - previous[i - 1]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode,solver,T,skip,eta", [
    ("per-step", "anderson", 10, "uniform", 0.0), ("per-step", "picard", 7, "quad", 0.5),
    ("all-timesteps", "picard", 10, "uniform", 0.0), ("all-timesteps", "anderson", 10, "uniform", 0.0),
    ("all-timesteps", "triangular-anderson", 10, "uniform", 0.0),
    ("all-timesteps", "triangular-anderson", 7, "quad", 0.5)])
def test_the_chain_regenerates_x0_from_the_exact_latent(net, mode, solver, T, skip, eta):
    chain = Chain.build(ABAR, T, skip, eta)
    x0 = images()
    noise = fixed_noise(chain, x0)
    x_T, states, report = exact_invert(net, x0, chain, mode=mode, solver=solver, noise=noise, **TIGHT)
    with torch.no_grad():
        regenerated = ddim_sample(net, x_T, chain, noise=noise, return_all=True)
        plain = ddim_sample(net, ddim_encode(net, x0, chain.with_eta(0.0)), chain, noise=noise)
    assert report.converged
    assert (regenerated[0] - x0).abs().max() <= 1e-7
    # every state, not only x_0: sequential row k is x_k, the inverse's row k-1 is x_k
    assert (regenerated[1:] - states[:-1]).abs().max() <= 1e-7
    assert (plain - x0).abs().max() > 1e-2          # the test model makes plain DDIM inversion inexact
    assert torch.equal(x_T, states[-1])


def test_all_timestep_solution_equals_the_per_step_solution(net):
    chain = Chain.build(ABAR, 8)
    x0 = images(batch=2, seed=3)
    a, _, _ = exact_invert(net, x0, chain, mode="per-step", solver="anderson", **TIGHT)
    for solver in SOLVERS:
        b, _, report = exact_invert(net, x0, chain, mode="all-timesteps", solver=solver, **TIGHT)
        assert (a - b).abs().max() <= 1e-8
    assert report.depth == chain.T + max(report.image_iterations)


class LinearNoise(torch.nn.Module):
    """eps(x, t) = a_t x: every DDIM step is x_{i-1} = k_i x_i + sigma_i xi_i, so the inverse
    chain has a closed form."""

    def slope(self, t):
        return 0.4 + t.double() / 1000.0

    def forward(self, x, t):
        return self.slope(t).to(x.dtype)[:, None, None, None] * x


@pytest.mark.parametrize("mode", ["per-step", "all-timesteps"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_linear_eps_gives_the_closed_form_latent(mode, eta):
    chain = Chain.build(ABAR, 9, "quad", eta)
    x0 = images(seed=5)
    noise = fixed_noise(chain, x0, seed=6)
    model = LinearNoise()
    x_T, states, _ = exact_invert(model, x0, chain, mode=mode, solver="anderson", noise=noise, **TIGHT)
    # Closed form from the predict-x0 step: x_{i-1} = k_i x_i + sigma_i xi_i, k_i =
    # sqrt(a_prev) (1 - sqrt(1 - a_cur) a) / sqrt(a_cur) + sqrt(1 - a_prev - sigma^2) a.
    abar, sigmas = chain.abar.tolist(), chain.sigmas.tolist()
    x = x0
    for i in range(1, chain.T + 1):
        a = float(model.slope(torch.tensor(chain.timesteps[i - 1])))
        a_cur, a_prev, s = abar[i], abar[i - 1], sigmas[i - 1]
        k = a_prev ** 0.5 * (1 - (1 - a_cur) ** 0.5 * a) / a_cur ** 0.5 + max(1 - a_prev - s * s, 0) ** 0.5 * a
        x = (x - (s * noise[i - 1] if s > 0 else 0)) / k
        assert (states[i - 1] - x).abs().max() <= 1e-9 * (1 + x.abs().max())
    assert torch.allclose(x_T, x, atol=1e-9)


def test_results_do_not_depend_on_the_batch(net):
    chain = Chain.build(ABAR, 6)
    x0 = images(batch=3, seed=8)
    for mode in ("per-step", "all-timesteps"):
        opts = dict(mode=mode, solver="triangular-anderson", tol=1e-6, max_iter=100)
        together, _, rep = exact_invert(net, x0, chain, **opts)
        for b in range(3):
            alone, _, rep_b = exact_invert(net, x0[b:b + 1], chain, **opts)
            assert torch.allclose(alone[0], together[b], atol=1e-12)
            assert rep_b.image_iterations == [rep.image_iterations[b]]
            assert rep_b.network_evals == [rep.network_evals[b]]


def test_ddim_inversion_start_is_ddim_encode(net):
    chain = Chain.build(ABAR, 10)
    x0 = images()
    with torch.no_grad():
        states = ddim_inversion_states(net, x0, chain)
        assert torch.allclose(states[-1], ddim_encode(net, x0, chain), atol=1e-12)
        assert torch.allclose(states[3], ddim_encode(net, x0, Chain(chain.timesteps[:4], chain.abar[:5])), atol=1e-12)
        # A time shard's block of rows: the same states, only those kept.
        assert torch.equal(ddim_inversion_states(net, x0, chain, rows=slice(3, 7)), states[3:7])


def test_report_counts_calls_and_evaluations(net):
    T = 10
    chain = Chain.build(ABAR, T)
    x0 = images(batch=2)
    _, _, rep = exact_invert(net, x0, chain, solver="picard", tol=0.0, max_iter=6, on_fail="return")
    assert rep.depth == T + 6 and rep.start_depth == T
    assert rep.network_evals == [T + 6 * T] * 2
    assert rep.image_iterations == [6, 6] and not rep.converged
    _, _, rep = exact_invert(net, x0, chain, mode="per-step", solver="picard", tol=0.0, max_iter=3,
                             on_fail="return")
    assert rep.depth == T * (1 + 3) and rep.network_evals == [T * 4] * 2
    _, _, rep = exact_invert(net, x0, chain, solver="picard", tol=0.0, max_iter=2, init="gaussian",
                             on_fail="return")
    assert rep.depth == 2 and rep.network_evals == [2 * T] * 2


def test_all_timestep_map_row_order_and_fixed_point(net):
    """Rows are x_T..x_1; the exact chain (from a sequential oracle) is the map's fixed point."""
    chain = Chain.build(ABAR, 6)
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seq = ddim_sample(net, x_T, chain, return_all=True)          # x_0..x_{T-1}
        states = torch.cat([seq[1:], x_T[None]])                     # x_1..x_T
        G = InverseChainMap(net, chain, seq[0])
        out = G(states.flip(0))
    assert (out - states.flip(0)).abs().max() <= 1e-10
    assert G.calls == 1 and G.network_rows == 6


class StiffNoise(torch.nn.Module):
    """Lip(eps) = 40, bounded and never flat for long: step 1 (|c| sqrt(abar) = 0.01) contracts,
    the later steps of T = 6 (|c| sqrt(abar) > 0.1) do not, and their iterates wander for ever."""

    def forward(self, x, t):
        return 40.0 * torch.sin(x)


@pytest.mark.parametrize("mode", ["per-step", "all-timesteps"])
def test_stiff_model_fails_with_the_condition_and_per_state_residuals(mode):
    chain = Chain.build(ABAR, 6)
    x0 = images(batch=2)
    assert contraction_factors(chain)[0] * 40 < 1 < contraction_factors(chain)[1] * 40
    with pytest.raises(InversionNotConverged) as info:
        exact_invert(StiffNoise(), x0, chain, mode=mode, solver="picard", tol=1e-6, max_iter=30)
    message, report = str(info.value), info.value.report
    assert "contraction" in message and "|c_i| sqrt(abar_i) Lip(eps) < 1" in message
    assert "x_2 (t=" in message and "x_1 (t=" not in message
    assert not report.converged and report.failed_images() == [0, 1]
    assert len(report.row_residual) == 6 and all(len(r) == 2 for r in report.row_residual)
    if mode == "per-step":          # the first step contracts and converged on its own
        assert max(report.row_residual[0]) < 1e-6 and 1 not in report.failed_states()
    assert min(report.row_residual[1]) > 1e-3
    _, _, returned = exact_invert(StiffNoise(), x0, chain, mode=mode, solver="picard", tol=1e-6,
                                  max_iter=30, on_fail="return")
    assert not returned.converged and returned.row_residual == report.row_residual


def test_nan_raises_the_solver_error_with_the_condition():
    class NaNAfter(torch.nn.Module):
        calls = 0

        def forward(self, x, t):
            self.calls += 1
            return x * (float("nan") if self.calls > 12 else 0.5)

    with pytest.raises(SolverDivergedError, match="exact inversion.*contraction"):
        exact_invert(NaNAfter(), images(), Chain.build(ABAR, 10), solver="anderson", tol=0.0,
                     max_iter=20, on_fail="return")


def test_bad_input_is_named(net):
    chain = Chain.build(ABAR, 5)
    x0 = images()
    with pytest.raises(ValueError, match="unknown mode"):
        exact_invert(net, x0, chain, mode="sideways")
    with pytest.raises(ValueError, match="unknown solver"):
        exact_invert(net, x0, chain, solver="newton")
    with pytest.raises(ValueError, match="on_fail"):
        exact_invert(net, x0, chain, on_fail="ignore")
    with pytest.raises(ValueError, match="injected noise"):
        exact_invert(net, x0, chain.with_eta(0.5))
    with pytest.raises(ValueError, match="noise must have shape"):
        exact_invert(net, x0, chain.with_eta(0.5), noise=torch.zeros(4, 3, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="init"):
        exact_invert(net, x0, chain, init="zeros")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        exact_invert(net, x0[0], chain)
    with pytest.raises(TypeError, match="takes no option"):
        exact_invert(net, x0, chain, solver="picard", m=3)


# ---- gaussianity ------------------------------------------------------------------------------
def test_white_noise_has_zero_autocorrelation_and_kurtosis_three():
    z = torch.randn(8, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    r, k = lag1_autocorrelation(z), kurtosis(z)
    assert r.shape == k.shape == (8,)
    assert r.abs().max() < 0.03                    # std ~ 1 / sqrt(2 * 2 * 64 * 63) ~ 0.008
    assert (k - 3).abs().max() < 0.3               # std ~ sqrt(24 / 8192) ~ 0.05


def test_known_correlation_and_kurtosis_against_independent_oracles():
    gen = torch.Generator().manual_seed(1)
    n = torch.randn(4, 1, 96, 97, generator=gen, dtype=torch.float64)
    ma = n + n.roll(1, dims=-1)                    # horizontal lag-1 corr 0.5, vertical 0: mean 0.25
    assert (lag1_autocorrelation(ma) - 0.25).abs().max() < 0.03
    u = torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    expected = [scipy.stats.kurtosis(u[b].numpy().ravel(), fisher=True, bias=True) + 3 for b in range(4)]
    assert np.allclose(kurtosis(u).numpy(), expected, rtol=1e-10)
    assert (kurtosis(u) - 1.8).abs().max() < 0.1   # uniform


def test_smooth_field_is_far_from_white_noise():
    y, x = torch.meshgrid(torch.linspace(0, 3.0, 32), torch.linspace(0, 3.0, 32), indexing="ij")
    field = (torch.sin(x) * torch.cos(y))[None, None].repeat(2, 1, 1, 1)
    stats = gaussianity(field)
    assert min(stats["lag1_autocorrelation"]) > 0.9
    assert all(abs(k - 3) > 0.5 for k in stats["kurtosis"])
    with pytest.raises(ValueError, match="B, C, H, W"):
        kurtosis(field[0])


def test_freezing_settled_states_saves_evaluations_and_keeps_the_solution(net):
    """freeze: states x_1.. whose residual (and that of all earlier states) is below tol keep their
    eps; the result stays a fixed point to about tol, with fewer network evaluations."""
    chain = Chain.build(ABAR, 10)
    x0 = images(batch=2, seed=4)
    full, _, rep_full = exact_invert(net, x0, chain, solver="picard", tol=1e-9, max_iter=200)
    frozen, _, rep = exact_invert(net, x0, chain, solver="picard", tol=1e-9, max_iter=200, freeze=True)
    assert rep.converged and max(rep.network_evals) < max(rep_full.network_evals)
    assert (frozen - full).abs().max() <= 1e-6
    with torch.no_grad():
        assert (ddim_sample(net, frozen, chain) - x0).abs().max() <= 1e-6


def test_extrapolated_start_is_second_order_where_ddim_inversion_is_first_order(net):
    """Halving the step size cuts the start's x_T error ~4x (second order) against ~2x for plain
    DDIM inversion; the oracle is the per-step exact solve."""
    x0 = images(seed=7)
    errors = {"ddim": [], "extrapolated": []}
    for T in (20, 40):
        chain = Chain.build(ABAR, T)
        exact, _, _ = exact_invert(net, x0, chain, mode="per-step", solver="anderson", **TIGHT)
        with torch.no_grad():
            errors["ddim"].append(float((ddim_inversion_states(net, x0, chain)[-1] - exact).norm()))
            errors["extrapolated"].append(
                float((extrapolated_inversion_states(net, x0, chain)[-1] - exact).norm()))
    ddim_ratio = errors["ddim"][0] / errors["ddim"][1]
    ext_ratio = errors["extrapolated"][0] / errors["extrapolated"][1]
    assert 1.5 < ddim_ratio < 2.6
    assert ext_ratio > 3.5
    assert errors["extrapolated"][1] < 0.5 * errors["ddim"][1]


def test_extrapolated_start_costs_t_calls_and_solves_to_the_same_latent(net):
    """Same network calls as plain DDIM inversion; with eta > 0 and fixed noise the all-timestep
    solve from it reaches the per-step solution, and the report counts the start's T calls."""
    chain = Chain.build(ABAR, 9, "quad", 0.5)
    x0 = images(seed=8)
    noise = fixed_noise(chain, x0, seed=9)
    calls = []

    def counted(x, t):
        calls.append(int(t[0]))
        return net(x, t)

    with torch.no_grad():
        extrapolated_inversion_states(counted, x0, chain, noise)
    assert len(calls) == chain.T
    # Every state is evaluated at its own time except the first step's guess (x_0 at s_0).
    assert calls == [chain.timesteps[0]] + list(chain.timesteps[:-1])
    per_step, _, _ = exact_invert(net, x0, chain, mode="per-step", solver="anderson", noise=noise, **TIGHT)
    x_T, _, report = exact_invert(net, x0, chain, mode="all-timesteps", solver="picard", noise=noise,
                                  init="extrapolated", **TIGHT)
    assert (x_T - per_step).abs().max() <= 1e-8
    assert report.start_depth == chain.T and report.depth == chain.T + max(report.image_iterations)
    with pytest.raises(ValueError, match="extrapolated"):
        exact_invert(net, x0, chain, mode="all-timesteps", noise=noise, init="second-order")
