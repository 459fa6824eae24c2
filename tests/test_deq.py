"""The DEQ fixed point against its oracle, the sequential DDIM chain."""
from __future__ import annotations

import pytest
import torch

from deqlit.diffusion.chain import Chain
from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.layer import DEQSampler
from deqlit.deq.solvers import SolverDivergedError, solve
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas, timestep_sequence
from deqlit.diffusion.sequential import ddim_sample
from tests.conftest import GaussianDataNoise, perturbed_unet
from tests.tiny import GradRowCounter

ABAR = alphas_cumprod(linear_betas())
SOLVERS = ["picard", "anderson", "triangular-anderson"]


@pytest.fixture(scope="module")
def net64():
    return GaussianDataNoise(dtype=torch.float64)


def chain_inputs(T: int, eta: float, seed: int, dtype=torch.float64, batch: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 1, 8, 8, generator=gen, dtype=dtype)
    noise = torch.randn(T, batch, 1, 8, 8, generator=gen, dtype=dtype) if eta > 0 else None
    return x_T, noise


@pytest.mark.parametrize("T", [10, 50])
@pytest.mark.parametrize("skip", ["uniform", "quad"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_picard_equals_sequential_ddim_after_exactly_T_iterations(net64, T, skip, eta):
    seq = timestep_sequence(T, 1000, skip)
    x_T, noise = chain_inputs(len(seq), eta, seed=T)
    with torch.no_grad():
        states = ddim_sample(net64, x_T, Chain.from_sequence(ABAR, seq, eta), noise=noise, return_all=True)
        deq = DEQSampler(net64, Chain.from_sequence(ABAR, seq, eta), "picard", dict(max_iter=10 * T, tol=0.0))
        X, stats = deq(x_T, noise)
    assert stats.iterations == len(seq)            # stops at T: exact there
    assert (X[0] - states[0]).abs().max() <= 1e-5
    assert (X - states).abs().max() <= 1e-5        # every state, not only x_0


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sequential_solver_is_ddim_one_state_a_call(eta):
    """The registered 'sequential' solver through the fixed-point map: every state of
    diffusion.sequential.ddim_sample's chain (the oracle), T calls, one network row per call."""
    T = 12
    model = perturbed_unet(dtype=torch.float64)
    chain = Chain.build(ABAR, T, eta=eta)
    x_T, noise = chain_inputs(T, eta, seed=4)
    with torch.no_grad():
        states = ddim_sample(model, x_T, chain, noise=noise, return_all=True)
        deq = DEQSampler(model, chain, "sequential")
        X, stats = deq(x_T, noise)
    assert stats.iterations == T and stats.network_rows == T       # T - 1 states + x_T
    assert (X - states).abs().max() <= 1e-10
    with pytest.raises(TypeError, match="takes no option"):
        solve("sequential", deq.make_map(), X, max_iter=3)


class StiffNoise(torch.nn.Module):
    """A synthetic eps(x, t) with a large Jacobian: errors do not fade along the chain, so the
    one-state-per-call count is visible (a small UNet's errors shrink too fast to see it)."""

    def forward(self, x, t):
        return 3.0 * torch.tanh(4.0 * x + t.to(x.dtype)[:, None, None, None] / 500.0)


def test_plain_iteration_settles_one_state_per_call():
    """After k calls the states next to x_T (rows >= T - k) are exact and the next one is not."""
    T = 12
    net = StiffNoise()
    seq = timestep_sequence(T)
    x_T, _ = chain_inputs(T, 0.0, seed=1)
    with torch.no_grad():
        states = ddim_sample(net, x_T, Chain.from_sequence(ABAR, seq), return_all=True)
        for k in (1, 4, 8, T - 1):
            X, _ = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), "picard", dict(max_iter=k, tol=0.0))(x_T)
            err = (X - states).abs().flatten(1).amax(1)
            assert err[T - k:].max() <= 1e-10
            assert err[T - k - 1] > 1e-4
        X, stats = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), "picard", dict(max_iter=100, tol=0.0))(x_T)
    assert stats.iterations == T and (X - states).abs().max() <= 1e-10


@pytest.mark.parametrize("solver", ["anderson", "triangular-anderson"])
@pytest.mark.parametrize("T", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_accelerated_solvers_reach_sequential_in_float32(solver, T, eta):
    net = GaussianDataNoise(dtype=torch.float32)
    seq = timestep_sequence(T)
    x_T, noise = chain_inputs(T, eta, seed=7, dtype=torch.float32)
    with torch.no_grad():
        ref = ddim_sample(net, x_T, Chain.from_sequence(ABAR, seq, eta), noise=noise)
        X, stats = DEQSampler(net, Chain.from_sequence(ABAR, seq, eta), solver, dict(max_iter=200, tol=1e-6))(x_T, noise)
    assert (X[0] - ref).abs().max() <= 1e-4
    assert stats.iterations <= T


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_solver_needs_more_than_T_iterations(solver, seed):
    """Even with a tolerance no solver can meet, every solver stops exact at T calls."""
    net = GaussianDataNoise(seed=seed, weight=1.0, dtype=torch.float64)
    T = 25
    seq = timestep_sequence(T)
    x_T, _ = chain_inputs(T, 0.0, seed=seed, batch=2)
    with torch.no_grad():
        ref = ddim_sample(net, x_T, Chain.from_sequence(ABAR, seq))
        X, stats = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), solver, dict(max_iter=1000, tol=0.0))(x_T)
    assert stats.iterations == T
    assert (X[0] - ref).abs().max() <= 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
def test_freezing_settled_states_saves_network_rows_without_changing_the_result(net64, solver):
    T = 20
    seq = timestep_sequence(T)
    x_T, _ = chain_inputs(T, 0.0, seed=3)
    with torch.no_grad():
        ref = ddim_sample(net64, x_T, Chain.from_sequence(ABAR, seq))
        X, stats = DEQSampler(net64, Chain.from_sequence(ABAR, seq, 0.0), solver, dict(max_iter=T, tol=0.0, freeze=True))(x_T)
        _, plain = DEQSampler(net64, Chain.from_sequence(ABAR, seq, 0.0), solver, dict(max_iter=T, tol=0.0))(x_T)
    assert (X[0] - ref).abs().max() <= 1e-8
    assert stats.network_rows < 0.7 * plain.network_rows


def test_chunked_network_calls_give_the_same_map(net64):
    seq = timestep_sequence(10)
    x_T, _ = chain_inputs(10, 0.0, seed=4)
    X = torch.randn(10, 3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        whole = FixedPointMap(net64, Chain.from_sequence(ABAR, seq)).bind(x_T)(X)
        chunked = FixedPointMap(net64, Chain.from_sequence(ABAR, seq), max_batch=4).bind(x_T)(X)
    assert torch.allclose(whole, chunked, atol=1e-12)


def test_stats_report_residual_traces_and_network_rows(net64):
    T = 10
    seq = timestep_sequence(T)
    x_T, _ = chain_inputs(T, 0.0, seed=5)
    with torch.no_grad():
        _, stats = DEQSampler(net64, Chain.from_sequence(ABAR, seq, 0.0), "anderson", dict(max_iter=T, tol=1e-3))(x_T)
    assert len(stats.rel_residual) == len(stats.abs_residual) == stats.iterations
    assert len(stats.row_residual) == T
    assert stats.network_rows == stats.iterations * (T - 1) + 1
    assert stats.rel_residual[-1] < stats.rel_residual[0]


def test_frozen_network_one_step_gradient_evaluates_only_x_T_with_autograd():
    """Inversion's case (weights frozen): the layer reuses the solver's eps and evaluates only
    eps(x_T) with autograd, yet gives the same X and the same d loss / d x_T as the full damped
    step (1 - tau) X* + tau h(X*; x_T), recomputed here with a fresh map."""
    T, tau = 8, 0.1
    seq = timestep_sequence(T)
    net = GradRowCounter(GaussianDataNoise(seed=3, dtype=torch.float64).requires_grad_(False))
    x_T, _ = chain_inputs(T, 0.0, seed=9, batch=2)
    layer = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), "anderson", dict(max_iter=4, tol=0.0), grad="onestep", tau=tau)
    x = x_T.clone().requires_grad_(True)
    X, _ = layer(x)
    assert net.rows_with_grad == 2                       # eps(x_T) of the 2 images, nothing else
    weight = torch.randn(X[0].shape, generator=torch.Generator().manual_seed(1), dtype=X.dtype)
    (weight * X[0]).sum().backward()     # a linear loss: the same upstream gradient for both

    with torch.no_grad():   # same solve, not converged (4 of 8 iterations): X* is f(X_last)
        X_star, _ = DEQSampler(net, Chain.from_sequence(ABAR, seq, 0.0), "anderson", dict(max_iter=4, tol=0.0))(x_T)
    x2 = x_T.clone().requires_grad_(True)
    full = (1 - tau) * X_star + tau * FixedPointMap(net, Chain.from_sequence(ABAR, seq)).bind(x2)(X_star)
    (weight * full[0]).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    # The values differ only by h(X*) - f(X_last), i.e. by the solver's residual.
    assert torch.allclose(X, X_star, atol=1e-12)
    assert (full - X).abs().max() <= tau * (X_star - FixedPointMap(net, Chain.from_sequence(ABAR, seq)).bind(x_T)(X_star)).abs().max() + 1e-12


def test_one_step_gradient_equals_autograd_of_one_damped_step(net64):
    """d loss / d x_T from the layer equals autograd through (1 - tau) X* + tau h(X*; x_T)
    written out by hand with the sequential-form coefficients; also a gradcheck on x_T."""
    T, tau = 6, 0.1
    seq = timestep_sequence(T)
    x_T, _ = chain_inputs(T, 0.0, seed=6, batch=2)
    layer = DEQSampler(net64, Chain.from_sequence(ABAR, seq, 0.0), "picard", dict(max_iter=T, tol=0.0), grad="onestep", tau=tau)
    x = x_T.clone().requires_grad_(True)
    X, _ = layer(x)
    target = torch.zeros_like(X[0])
    (X[0] - target).pow(2).sum().backward()

    # Hand-derived: row 0 of h is x_0 = y_T + sum_j c_j eps(x_j) with X* fixed (abar_0 = 1).
    with torch.no_grad():
        X_star, _ = DEQSampler(net64, Chain.from_sequence(ABAR, seq, 0.0), "picard", dict(max_iter=T, tol=0.0))(x_T)
    from deqlit.diffusion.schedule import chain_alphas, ddim_sigmas, fixed_point_coefficients
    chain = chain_alphas(ABAR, seq)
    c, _ = fixed_point_coefficients(chain, ddim_sigmas(chain, 0.0))
    x2 = x_T.clone().requires_grad_(True)
    eps_top = net64(x2, torch.full((2,), seq[-1]))
    h0 = x2 / chain[T].sqrt() + c[T - 1] * eps_top
    for j in range(1, T):
        h0 = h0 + c[j - 1] * net64(X_star[j], torch.full((2,), seq[j - 1])).detach()
    out = (1 - tau) * X_star[0] + tau * h0
    (out - target).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-8, atol=1e-10)

    # The map's own autograd against finite differences, X* held fixed (what the step assumes).
    short_seq = seq[:3]
    with torch.no_grad():
        X3, _ = DEQSampler(net64, Chain.from_sequence(ABAR, short_seq, 0.0), "picard", dict(max_iter=3, tol=0.0))(x_T[:1])

    def damped_step(inp):
        return (1 - tau) * X3 + tau * FixedPointMap(net64, Chain.from_sequence(ABAR, short_seq)).bind(inp)(X3)
    small = x_T[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(damped_step, (small,), eps=1e-6, atol=1e-6)


def test_one_step_gradient_reaches_network_parameters(net64):
    seq = timestep_sequence(5)
    x_T, _ = chain_inputs(5, 0.0, seed=8, batch=1)
    layer = DEQSampler(net64, Chain.from_sequence(ABAR, seq, 0.0), "anderson", dict(max_iter=5), grad="onestep")
    X, _ = layer(x_T)
    X[0].sum().backward()
    grads = [p.grad for p in net64.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    net64.zero_grad(set_to_none=True)


def test_unknown_solver_or_option_raises():
    f = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown solver"):
        solve("newton", f, torch.zeros(3, 1, 2))
    with pytest.raises(TypeError, match="no option"):
        solve("picard", f, torch.zeros(3, 1, 2), m=5)
    with pytest.raises(ValueError, match="grad mode"):
        DEQSampler(torch.nn.Identity(), Chain.from_sequence(ABAR, [0, 1]), grad="full")


@pytest.mark.parametrize("solver", SOLVERS)
def test_nan_raises_with_iteration_and_remedy(solver):
    calls = {"n": 0}

    def f(x, frozen_from=None):
        calls["n"] += 1
        out = x * 0.5 + 1.0
        if calls["n"] == 3:
            out = out * float("nan")
        return out
    with pytest.raises(SolverDivergedError, match=r"iteration 3.*(beta|lam|picard)"):
        solve(solver, f, torch.zeros(10, 1, 4), max_iter=20, tol=0.0)


def test_eta_needs_injected_noise(net64):
    with pytest.raises(ValueError, match="injected noise"):
        FixedPointMap(net64, Chain.build(ABAR, 5, eta=0.5)).bind(torch.zeros(1, 1, 8, 8, dtype=torch.float64))


def test_package_exports_the_documented_names():
    import deqlit
    assert deqlit.DDIMUNet is not None and callable(deqlit.load_weights)
    assert {"sequential", "picard", "anderson", "triangular-anderson"} <= set(deqlit.SOLVERS)
