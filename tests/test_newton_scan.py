"""newton-scan (deqlit/deq/newton_scan.py) against independent oracles: the scan against a row-by-row
back-substitution of the Newton equations, the solve against sequential DDIM and against picard's
exact T-iteration result."""
from __future__ import annotations

import pytest
import torch

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.jacobian_table import gain_table
from deqlit.deq.layer import DEQSampler
from deqlit.deq.newton_scan import compose_scan, scan_correction
from deqlit.deq.solvers import SolverDivergedError, solve
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.diffusion.sequential import ddim_sample
from tests.conftest import GaussianDataNoise, perturbed_unet

ABAR = alphas_cumprod(linear_betas())


def inputs(T: int, eta: float, seed: int, batch: int = 2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 1, 8, 8, generator=gen, dtype=dtype)
    noise = torch.randn(T, batch, 1, 8, 8, generator=gen, dtype=dtype) if eta > 0 else None
    return x_T, noise


def back_substitution(scale, weight, inclusive, g, R):
    """dX of the Newton equations dX_r = s_r sum_{r' in S(r)} w_r' g_r' dX_r' + R_r, solved row by
    row from the top with the sums written out (O(rows^2)): the definition, not a scan."""
    rows = R.shape[0]
    view = (-1,) + (1,) * (R.dim() - 2)
    p = weight[:, None] * g
    dX = torch.zeros_like(R)
    for r in reversed(range(rows)):
        later = sum((p[q].reshape(view) * dX[q] for q in range(r + 1, rows)), torch.zeros_like(R[0]))
        if inclusive:              # row r's own term: dX_r (1 - s_r p_r) = s_r later + R_r
            dX[r] = (scale[r] * later + R[r]) / (1 - scale[r] * p[r]).reshape(view)
        else:
            dX[r] = scale[r] * later + R[r]
    return dX


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, 16])
def test_scan_equals_back_substitution_of_the_newton_equations(rows, inclusive):
    gen = torch.Generator().manual_seed(rows)
    scale = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    weight = -torch.rand(rows, generator=gen, dtype=torch.float64) * (-1 if inclusive else 1)
    g = torch.rand(rows, 3, generator=gen, dtype=torch.float64) * 2
    R = torch.randn(rows, 3, 1, 4, 4, generator=gen, dtype=torch.float64)
    U = scan_correction(scale, weight, inclusive, g, R)
    dX = scale.reshape(-1, 1, 1, 1, 1) * U + R
    oracle = back_substitution(scale, weight, inclusive, g, R)
    assert (dX - oracle).abs().max() <= 1e-12 * oracle.abs().max()
    # g = 0: no correction, the update is picard's.
    assert scan_correction(scale, weight, inclusive, torch.zeros_like(g), R).abs().max() == 0


def test_compose_scan_equals_composing_one_map_after_another():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(13, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(13, 2, 5, generator=gen, dtype=torch.float64)
    A, Bv = compose_scan(a, b)
    u0 = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    u = u0
    for k in range(13):
        u = a[k, :, None] * u + b[k]
        assert (A[k, :, None] * u0 + Bv[k] - u).abs().max() <= 1e-10


def test_a_linear_network_is_solved_in_three_calls():
    """eps = k_t x (GaussianDataNoise without its UNet) has one scalar Jacobian per row: after the
    first call's prior, the secant is exact and the Newton step lands on the fixed point."""
    net = GaussianDataNoise(weight=0.0, dtype=torch.float64)
    chain = Chain.build(ABAR, 50)
    x_T, _ = inputs(50, 0.0, seed=1)
    with torch.no_grad():
        ref = ddim_sample(net, x_T, chain)
        X, stats = DEQSampler(net, chain, "newton-scan", dict(max_iter=50, tol=1e-9))(x_T)
        _, picard = DEQSampler(net, chain, "picard", dict(max_iter=50, tol=1e-9))(x_T)
    assert stats.iterations <= 3 < picard.iterations
    assert (X[0] - ref).abs().max() <= 1e-9


def shipped_model():
    from deqlit.config import find_config, load_config
    from deqlit.models.build import build_noise_model
    model, abar, _ = build_noise_model(load_config(find_config("faces")))
    return model.double(), abar


@pytest.mark.parametrize("network, eta", [pytest.param("shipped", 0.5, marks=pytest.mark.slow),
                                          ("unet", 0.0), ("unet", 0.5)])
def test_settled_rows_are_exact_and_the_solve_ends_exact_at_T_calls(one_thread, network, eta):
    """The triangular guarantee on a real network (float64): the shipped faces model (T = 6) and the
    tests' perturbed UNet (T = 12). After k calls the rows >= T - k equal sequential DDIM's states,
    and with tol 0 the solve stops at T calls on picard's exact T-call result."""
    if network == "shipped":
        model, abar = shipped_model()
        T, shape = 6, (1, 1, 32, 32)
    else:
        model, abar, T, shape = GaussianDataNoise(seed=3, weight=1.0), ABAR, 12, (2, 1, 8, 8)
    chain = Chain.build(abar, T, eta=eta)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(*shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(T, *shape, generator=gen, dtype=torch.float64) if eta > 0 else None
    seen = []
    with torch.no_grad():
        states = ddim_sample(model, x_T, chain, noise=noise, return_all=True)       # (T, B, ...)
        fmap = FixedPointMap(model, chain).bind(x_T, noise)
        X, stats = solve("newton-scan", fmap, x_T[None].expand(T, *x_T.shape).clone(), max_iter=100,
                         tol=0.0, callback=lambda n, s, fx: seen.append(fx.clone()))
        P, _ = DEQSampler(model, chain, "picard", dict(max_iter=T, tol=0.0))(x_T, noise)
    assert stats.iterations == T and stats.converged
    for k, fx in enumerate(seen, start=1):
        err = (fx - states).abs().flatten(1).amax(1)
        assert err[T - k:].max() <= 1e-10, k
    assert (X - P).abs().max() <= 1e-10 and (X - states).abs().max() <= 1e-10
    first = (seen[0] - states).abs().flatten(1).amax(1)
    assert first[:T - 1].min() > 1e-4          # the rows below were not exact at the first call


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_nonlinear_chain_reaches_sequential_in_fewer_calls_than_picard(eta):
    net = GaussianDataNoise(seed=1, weight=1.0, dtype=torch.float64)
    T = 25
    chain = Chain.build(ABAR, T, eta=eta)
    x_T, noise = inputs(T, eta, seed=2)
    with torch.no_grad():
        ref = ddim_sample(net, x_T, chain, noise=noise)
        X, stats = DEQSampler(net, chain, "newton-scan", dict(max_iter=100, tol=1e-8))(x_T, noise)
        _, picard = DEQSampler(net, chain, "picard", dict(max_iter=100, tol=1e-8))(x_T, noise)
    assert (X[0] - ref).abs().max() <= 1e-6
    assert stats.iterations < picard.iterations <= T


def test_images_stop_on_their_own_and_do_not_depend_on_the_batch():
    net = GaussianDataNoise(seed=2, weight=1.0, dtype=torch.float64)
    chain = Chain.build(ABAR, 20)
    x_T, _ = inputs(20, 0.0, seed=4, batch=3)
    opts = dict(max_iter=20, tol=1e-4)
    with torch.no_grad():
        X, stats = DEQSampler(net, chain, "newton-scan", opts)(x_T)
        for b in range(3):
            Xb, sb = DEQSampler(net, chain, "newton-scan", opts)(x_T[b:b + 1])
            assert (Xb[:, 0] - X[:, b]).abs().max() <= 1e-10
            assert sb.image_iterations == [stats.image_iterations[b]]


def test_freezing_settled_rows_saves_network_rows_and_keeps_the_result():
    net = GaussianDataNoise(seed=0, weight=1.0, dtype=torch.float64)
    chain = Chain.build(ABAR, 20)
    x_T, _ = inputs(20, 0.0, seed=5)
    with torch.no_grad():
        ref = ddim_sample(net, x_T, chain)
        X, frozen = DEQSampler(net, chain, "newton-scan", dict(max_iter=20, tol=1e-7, freeze=True))(x_T)
        _, plain = DEQSampler(net, chain, "newton-scan", dict(max_iter=20, tol=1e-7))(x_T)
    assert (X[0] - ref).abs().max() <= 1e-6
    assert frozen.network_rows < plain.network_rows


@pytest.mark.parametrize("jacobian", ["table", "scalar"])
def test_nan_raises_with_its_iteration(jacobian):
    model = perturbed_unet(seed=0)
    calls = {"n": 0}

    def poisoned(x, t):
        calls["n"] += 1
        out = model(x, t)
        return out * float("nan") if calls["n"] == 4 else out      # call 1 is eps(x_T), in bind
    chain = Chain.build(ABAR, 10)
    x_T, _ = inputs(10, 0.0, seed=0)
    if jacobian == "table":          # measured before the count starts; the solve reuses it
        calls["n"] = -10 ** 6
        gain_table(poisoned, chain, tuple(x_T.shape[1:]), x_T.device, x_T.dtype)
        calls["n"] = 0
    with torch.no_grad(), pytest.raises(SolverDivergedError, match="newton-scan.*iteration 3"):
        DEQSampler(poisoned, chain, "newton-scan", dict(max_iter=10, tol=0.0, jacobian=jacobian))(x_T)


def test_a_model_that_gives_nan_while_its_table_is_measured_is_named():
    model = perturbed_unet(seed=0)
    chain = Chain.build(ABAR, 10)
    x_T, _ = inputs(10, 0.0, seed=0)
    with torch.no_grad(), pytest.raises(SolverDivergedError, match="Jacobian table"):
        DEQSampler(lambda x, t: model(x, t) * float("nan"), chain, "newton-scan",
                   dict(max_iter=10, tol=0.0))(x_T)


def test_a_map_without_the_chain_structure_is_refused():
    with pytest.raises(TypeError, match="scan_coefficients"):
        solve("newton-scan", lambda x: x, torch.zeros(3, 1, 2))


def test_inverse_map_structure_reproduces_the_map():
    """InverseChainMap's (s, w, inclusive) and row_eps rebuild G(X) by (1) of newton_scan.py:
    G(X)_r = s_r (y_0 + sum_{r' >= r} w_r' eps_r') in solver order (x_T first)."""
    from deqlit.deq.inverse_map import InverseChainMap
    net = GaussianDataNoise(seed=4, weight=1.0, dtype=torch.float64)
    chain = Chain.build(ABAR, 9, "quad")
    x0, _ = inputs(9, 0.0, seed=6)
    G = InverseChainMap(net, chain, x0)
    X = torch.randn(9, *x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        out = G(X)
    scale, weight, inclusive = G.scan_coefficients()
    view = (-1, 1, 1, 1, 1)
    later = (weight.reshape(view) * G.row_eps()).flip(0).cumsum(0).flip(0)     # r' >= r
    rebuilt = scale.reshape(view) * (x0[None] / float(chain.abar[0].sqrt()) + later)
    assert inclusive and (rebuilt - out).abs().max() <= 1e-12


@pytest.mark.parametrize("T,skip,eta", [(10, "uniform", 0.0), (7, "quad", 0.5)])
def test_exact_inversion_with_newton_scan_regenerates_x0(T, skip, eta):
    """The inverse map (inclusive rows, with the safeguards of the header) solved to 1e-11: the
    sequential chain regenerates x0 and every state; the latent of triangular Anderson."""
    from deqlit.deq.inverse_map import exact_invert
    net = GaussianDataNoise(seed=2, weight=1.0, dtype=torch.float64)
    chain = Chain.build(ABAR, T, skip, eta)
    x0, _ = inputs(T, 0.0, seed=8)
    noise = torch.randn((T,) + tuple(x0.shape), generator=torch.Generator().manual_seed(9),
                        dtype=torch.float64) if eta > 0 else None
    x_T, states, report = exact_invert(net, x0, chain, solver="newton-scan", noise=noise,
                                       tol=1e-11, max_iter=300)
    ref, _, _ = exact_invert(net, x0, chain, solver="triangular-anderson", noise=noise, tol=1e-11,
                             max_iter=300)
    with torch.no_grad():
        regenerated = ddim_sample(net, x_T, chain, noise=noise, return_all=True)
    assert report.converged
    assert (regenerated[0] - x0).abs().max() <= 1e-7
    assert (regenerated[1:] - states[:-1]).abs().max() <= 1e-7
    assert (x_T - ref).abs().max() <= 1e-8


def test_per_step_inversion_refuses_newton_scan_by_name():
    from deqlit.deq.inverse_map import exact_invert
    net = GaussianDataNoise(seed=2, weight=1.0, dtype=torch.float64)
    x0, _ = inputs(4, 0.0, seed=8)
    with pytest.raises(ValueError, match="newton-scan solves the all-timestep chain"):
        exact_invert(net, x0, Chain.build(ABAR, 4), mode="per-step", solver="newton-scan")


def test_a_solve_with_gradient_enabled_takes_the_same_steps():
    """The map keeps its eps cache free of graphs under gradient, but the secant must read the eps
    of the last call all the same: with autograd on, the same iterates and iterations as without
    (the cache's stale eps had cost 12.5 iterations for 8 on the shipped model at T = 25)."""
    net = GaussianDataNoise(seed=1, weight=1.0, dtype=torch.float64)
    chain = Chain.build(ABAR, 25)
    x_T, _ = inputs(25, 0.0, seed=2)
    start = x_T[None].expand(25, *x_T.shape).clone()
    runs = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            X, stats = solve("newton-scan", FixedPointMap(net, chain).bind(x_T), start, max_iter=100,
                             tol=1e-8)
        runs.append((X.detach(), stats.iterations))
    (a, n_a), (b, n_b) = runs
    assert n_a == n_b < 25 and (a - b).abs().max() <= 1e-10
