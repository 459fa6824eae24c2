"""Gradient modes through the DEQ (deqlit/deq/grad.py) against independent oracles: autograd
through the unrolled sequential DDIM chain (ift) and the damped step written out by hand (onestep)."""
from __future__ import annotations

import pytest
import torch

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.grad import GRAD_MODES, attach_gradient, solve_adjoint, ChainAdjoint
from deqlit.deq.layer import DEQSampler
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_sample
from tests.conftest import GaussianDataNoise
from tests.tiny import GradRowCounter

ABAR = alphas_cumprod(linear_betas())


@pytest.fixture(scope="module")
def net64():
    return GaussianDataNoise(seed=2, dtype=torch.float64)


def inputs(T: int, eta: float, seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 1, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(T, batch, 1, 8, 8, generator=gen, dtype=torch.float64) if eta > 0 else None
    target = torch.randn(T, batch, 1, 8, 8, generator=gen, dtype=torch.float64)
    return x_T, noise, target


def chain_loss(X: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A nonlinear loss on every state, so that every row's cotangent is nonzero and distinct."""
    weights = torch.linspace(1.0, 2.0, X.shape[0], dtype=X.dtype).reshape(-1, 1, 1, 1, 1)
    return (weights * (X - target) ** 2).sum() + 0.1 * (X[0] ** 3).sum()


def relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """||got - ref|| / ||ref|| over all tensors together (a per-tensor ratio is meaningless for
    weights whose exact gradient is zero, e.g. attention key biases under the softmax)."""
    diff = torch.cat([(a - b).flatten() for a, b in zip(got, ref)]).norm()
    return float(diff / torch.cat([b.flatten() for b in ref]).norm())


def sequential_grads(net, x_T, noise, target, chain, params):
    x = x_T.clone().requires_grad_(True)
    xi = None if noise is None else noise.clone().requires_grad_(True)
    states = ddim_sample(net, x, chain, noise=xi, return_all=True)
    wrt = [x] + ([xi] if xi is not None else []) + params
    return torch.autograd.grad(chain_loss(states, target), wrt)


@pytest.mark.parametrize("T,eta,max_batch,adjoint", [(3, 0.0, None, None), (10, 0.0, 5, None),
                                                     (10, 0.5, None, None), (7, 0.5, 4, None),
                                                     (10, 0.0, None, {"solver": "sweep"}),
                                                     (7, 0.5, 4, {"solver": "sweep"})])
def test_ift_equals_autograd_through_the_sequential_chain(net64, T, eta, max_batch, adjoint):
    chain = Chain.build(ABAR, T, eta=eta)
    x_T, noise, target = inputs(chain.T, eta, seed=T)
    params = list(net64.parameters())
    ref = sequential_grads(net64, x_T, noise, target, chain, params)

    x = x_T.clone().requires_grad_(True)
    xi = None if noise is None else noise.clone().requires_grad_(True)
    layer = DEQSampler(net64, chain, "anderson", dict(max_iter=50, tol=0.0), grad="ift", max_batch=max_batch,
                       adjoint=adjoint)
    X, _ = layer(x, xi)
    got = torch.autograd.grad(chain_loss(X, target), [x] + ([xi] if xi is not None else []) + params)
    assert relative_error(got[:1], ref[:1]) <= 1e-6                    # the latents
    if xi is not None:
        assert relative_error(got[1:2], ref[1:2]) <= 1e-6              # the injected noise
    assert relative_error(got[len(got) - len(params):], ref[len(ref) - len(params):]) <= 1e-6
    # Exact with plain iteration: the adjoint is triangular, so T calls and no more.
    assert layer.backward_stats.iterations == (chain.T if adjoint is None else chain.T - 1)


def test_ift_gradient_lands_in_parameter_grad_through_backward(net64):
    """loss.backward() (the optimizer's path) fills .grad of x_T and of every weight as the oracle."""
    T = 5
    chain = Chain.build(ABAR, T)
    x_T, _, target = inputs(T, 0.0, seed=11)
    params = list(net64.parameters())
    ref = sequential_grads(net64, x_T, None, target, chain, params)
    net64.zero_grad(set_to_none=True)
    x = x_T.clone().requires_grad_(True)
    X, _ = DEQSampler(net64, chain, "picard", dict(max_iter=T, tol=0.0), grad="ift")(x)
    chain_loss(X, target).backward()
    got = [x.grad] + [p.grad for p in params]
    net64.zero_grad(set_to_none=True)
    assert relative_error(got, list(ref)) <= 1e-6


@pytest.mark.parametrize("solver,options", [("picard", dict(freeze=False)), ("anderson", dict(m=3)),
                                            ("triangular-anderson", dict(m=3, freeze=True)),
                                            ("sweep", {})])
def test_every_adjoint_solver_reaches_the_exact_adjoint_within_T_calls(net64, solver, options):
    """g = J^T g + v against forward substitution row by row (row j from the exact rows < j)."""
    T = 8
    chain = Chain.build(ABAR, T)
    x_T, _, v = inputs(T, 0.0, seed=4)
    with torch.no_grad():
        fmap = FixedPointMap(net64, chain).bind(x_T)
        X_star, _ = DEQSampler(net64, chain, "picard", dict(max_iter=T, tol=0.0))(x_T)
        exact = torch.zeros_like(v)
        for j in range(T):
            known = exact.clone()
            known[j:] = 0
            exact[j] = v[j] + ChainAdjoint(fmap, X_star).transposed(known)[j]
        settings = {"solver": solver} if solver == "sweep" else {"solver": solver, "tol": 0.0, **options}
        g, stats = solve_adjoint(fmap, X_star, v, settings, None)
    assert stats.iterations <= T
    assert (g - exact).abs().max() <= 1e-10 * exact.abs().max()
    # The rows really interact (else the test would pass with g = v).
    assert (exact - v).abs().max() > 1e-2 * v.abs().max()


def test_sweep_adjoint_evaluates_each_state_once_with_the_weights(net64):
    """The sweep's product at state x_j already has x_j's final cotangent, so the weights' products
    ride along: T rows per image with a graph in backward (not T - 1 for the adjoint plus T for the
    weights), and the gradients still equal the sequential oracle's."""
    T, batch = 6, 2
    chain = Chain.build(ABAR, T)
    x_T, _, target = inputs(T, 0.0, seed=9, batch=batch)
    params = list(net64.parameters())
    ref = sequential_grads(net64, x_T, None, target, chain, params)
    net = GradRowCounter(net64)
    x = x_T.clone().requires_grad_(True)
    X, _ = DEQSampler(net, chain, "picard", dict(max_iter=T, tol=0.0), grad="ift", max_batch=3,
                      adjoint={"solver": "sweep"})(x)
    got = torch.autograd.grad(chain_loss(X, target), [x] + params)
    assert net.rows_with_grad == T * batch
    assert relative_error(got, list(ref)) <= 1e-6


def test_ift_network_calls_stay_within_max_batch_rows(net64):
    T, batch, max_batch = 6, 3, 4
    chain = Chain.build(ABAR, T)
    net = GradRowCounter(net64)
    x_T, _, target = inputs(T, 0.0, seed=5, batch=batch)
    x = x_T.clone().requires_grad_(True)
    X, _ = DEQSampler(net, chain, "picard", dict(max_iter=T, tol=0.0), grad="ift", max_batch=max_batch)(x)
    chain_loss(X, target).backward()
    assert 0 < net.largest_with_grad <= max_batch      # T * batch = 18 rows, never more than 4 at once
    net64.zero_grad(set_to_none=True)


def test_onestep_equals_its_hand_formula_for_latents_and_weights(net64):
    """onestep = autograd of (1 - tau) X* + tau h(X*), h written out with the sequential DDIM step's
    coefficients: x_r = sqrt(abar_r) (x_T / sqrt(abar_T) + sum_{j > r} c_j eps(x_j)),
    c_j = sqrt(1 - abar_{j-1}) / sqrt(abar_{j-1}) - sqrt(1 - abar_j) / sqrt(abar_j)."""
    T, tau = 5, 0.3
    chain = Chain.build(ABAR, T)
    x_T, _, target = inputs(T, 0.0, seed=6)
    params = list(net64.parameters())
    x = x_T.clone().requires_grad_(True)
    X, _ = DEQSampler(net64, chain, "picard", dict(max_iter=T, tol=0.0), grad="onestep", tau=tau)(x)
    got = torch.autograd.grad(chain_loss(X, target), [x] + params)

    with torch.no_grad():
        X_star = ddim_sample(net64, x_T, chain, return_all=True)
    a = chain.abar.tolist()
    coef = [((1 - a[j - 1]) / a[j - 1]) ** 0.5 - ((1 - a[j]) / a[j]) ** 0.5 for j in range(1, T + 1)]
    x2 = x_T.clone().requires_grad_(True)
    inputs_of = [None] + [X_star[j] for j in range(1, T)] + [x2]            # x_1..x_T
    eps = [None] + [net64(inputs_of[j], torch.full((2,), chain.timesteps[j - 1])) for j in range(1, T + 1)]
    rows = []
    for r in range(T):
        y = x2 / a[T] ** 0.5 + sum(coef[j - 1] * eps[j] for j in range(r + 1, T + 1))
        rows.append((1 - tau) * X_star[r] + tau * a[r] ** 0.5 * y)
    ref = torch.autograd.grad(chain_loss(torch.stack(rows), target), [x2] + params)
    assert relative_error(got[:1], ref[:1]) <= 1e-9
    assert relative_error(got[1:], ref[1:]) <= 1e-9


def test_onestep_and_ift_agree_in_direction_but_not_in_value(net64):
    """Both are descent directions for the same loss; the 1-step one is tau times the gradient
    with J dropped, so it is neither equal to the exact one nor opposite to it."""
    T = 6
    chain = Chain.build(ABAR, T)
    x_T, _, target = inputs(T, 0.0, seed=7)
    grads = {}
    for mode in ("onestep", "ift"):
        x = x_T.clone().requires_grad_(True)
        X, _ = DEQSampler(net64, chain, "picard", dict(max_iter=T, tol=0.0), grad=mode, tau=1.0)(x)
        grads[mode], = torch.autograd.grad(chain_loss(X, target), [x])
    cos = torch.nn.functional.cosine_similarity(grads["onestep"].flatten(), grads["ift"].flatten(), 0)
    assert 0 < cos < 0.9999


def test_grad_modes_are_an_explicit_switch(net64):
    assert GRAD_MODES == ("none", "onestep", "ift")
    chain = Chain.build(ABAR, 3)
    x_T, _, _ = inputs(3, 0.0, seed=8)
    fmap = FixedPointMap(net64, chain).bind(x_T)
    X = torch.zeros(3, *x_T.shape, dtype=x_T.dtype)
    assert attach_gradient("none", fmap, X, x_T.requires_grad_(True)) is X
    with pytest.raises(ValueError, match="grad mode"):
        attach_gradient("full", fmap, X, x_T)
    with pytest.raises(ValueError, match="unknown solver"):
        DEQSampler(net64, chain, grad="ift", adjoint={"solver": "newton"})
    with pytest.raises(ValueError, match="no option"):
        DEQSampler(net64, chain, grad="ift", adjoint={"solver": "picard", "m": 3})
    with pytest.raises(ValueError, match="no options"):
        DEQSampler(net64, chain, grad="ift", adjoint={"solver": "sweep", "tol": 0.0})
