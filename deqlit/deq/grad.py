"""How gradients pass the DEQ fixed point: an explicit switch between 'none', 'onestep' and 'ift'.

The forward solve finds X* = h(X*; x_T, theta) without a graph (fixed_point.py). A loss L(X*) then
needs dL/dx_T and dL/dtheta. With v = dL/dX* and J = dh/dX at X*, the implicit function theorem
gives
    dL/d(x_T, theta) = (dh/d(x_T, theta))^T g,    g = (I - J)^{-T} v,  i.e.  g = J^T g + v.   (IFT)
'onestep' (the paper's 1-step gradient, Eq. 18) replaces g by tau v: it differentiates one damped
step X = (1 - tau) X* + tau h(X*) with X* held fixed; one batched network call, whatever T is.

'ift' solves the adjoint fixed point exactly. It is triangular like the forward one: h's row r
(x_r) reads the states x_j, j > r, so J^T's row j collects cotangents of rows r < j. Written out
with the map's coefficients (fixed_point.py: x_r = s_r (y_T + sum_{q >= r} [c_q eps_q + d_q xi_q]),
s_r = sqrt(abar_r), eps_q = eps(x_{q+1})):
    u_q = sum_{r <= q} s_r g_r                  (cotangent of the term of state x_{q+1})
    w_q = c_q u_q                               (cotangent of eps(x_{q+1}))
    (J^T g)_j = (d eps(x_j) / d x_j)^T w_{j-1}, j = 1..T-1;  (J^T g)_0 = 0.
So row j of g depends on rows < j only: plain iteration from g = v makes rows 0..n exact after n
calls, and the same solvers (on the rows flipped, so that their 'rows > r' order holds) reach g
exactly within T calls. Then one vector-Jacobian product of h at X* with cotangent g gives
    dL/dx_T = u_{T-1} / s_T + (d eps(x_T)/d x_T)^T w_{T-1},  dL/dtheta = sum_q (d eps_q/d theta)^T w_q,
    dL/dxi_q = d_q u_q.
Every network vector-Jacobian product runs over at most `max_batch` rows at a time, with its graph
freed before the next chunk, so memory stays that of one chunk whatever T and the batch are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.reduce import reversed_reducer
from deqlit.deq.solvers import SolverStats, option_defaults, solve

GRAD_MODES = ("none", "onestep", "ift")
SWEEP = "sweep"   # adjoint 'solver': forward substitution, one row of J^T at a time
DEFAULT_ADJOINT: dict[str, Any] = {"solver": "picard", "tol": 0.0, "freeze": True}


def check_grad_mode(grad: str, tau: float) -> None:
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; use one of {GRAD_MODES}")
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")


def adjoint_settings(adjoint: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The adjoint solve's settings: {'solver': name, **solver options}, checked now, not in backward.

    Default: plain iteration with tol 0 and freezing, i.e. the exact adjoint in T calls, each call
    evaluating only the rows that are not settled yet (about T^2 / 2 network rows per image).
    'sweep' solves the triangular system row after row instead: exact with T - 1 rows per image
    but T - 1 sequential network calls (the cheaper choice where calls do not run in parallel,
    e.g. on a CPU); it takes no options.
    """
    settings = dict(DEFAULT_ADJOINT if adjoint is None else {"solver": "picard", **adjoint})
    if settings["solver"] == SWEEP:
        if len(settings) > 1:
            raise ValueError(f"the adjoint 'sweep' takes no options, got {sorted(set(settings) - {'solver'})}")
        return settings
    accepted = set(option_defaults(settings["solver"]))   # raises on an unknown solver name
    unknown = set(settings) - accepted - {"solver"}
    if unknown:
        raise ValueError(f"adjoint solver {settings['solver']!r} takes no option(s) {sorted(unknown)}; "
                         f"it accepts {sorted(accepted)}")
    return settings


# ---- vector-Jacobian products of the network, in row chunks -----------------------------------
def eps_vjp(model: nn.Module, states: torch.Tensor, timesteps: torch.Tensor, cotangent: torch.Tensor,
            params: Sequence[torch.Tensor] = (), max_batch: Optional[int] = None
            ) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """(d eps(x_r, t_r) / d x_r)^T w_r for every (row, image), and sum_r (d eps_r / d theta)^T w_r.

    states, cotangent (R, B, C, H, W); timesteps (R,) -> (grad states (R, B, C, H, W), grads of
    `params` (None where unused)). Each chunk of <= max_batch flattened rows builds its graph,
    is differentiated and freed before the next one.
    """
    rows, batch = states.shape[:2]
    grad_states = torch.zeros_like(states)
    grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
    if rows == 0:
        return grad_states, grad_params
    flat = states.detach().reshape(rows * batch, *states.shape[2:])
    flat_w = cotangent.reshape(flat.shape)
    flat_g = grad_states.view(flat.shape)
    t = timesteps.repeat_interleave(batch)
    step = flat.shape[0] if max_batch is None else max_batch
    for i in range(0, flat.shape[0], step):
        x = flat[i:i + step].clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(x, t[i:i + step])
            grads = torch.autograd.grad(out, [x, *params], flat_w[i:i + step], allow_unused=True)
        flat_g[i:i + step] = grads[0]
        for k, g in enumerate(grads[1:]):
            if g is not None:
                grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
    return grad_states, grad_params


@dataclass
class ChainAdjoint:
    """The map's coefficients at one solution, and the pieces of its transposed Jacobian, on the
    map's block of rows (all T in one process).

    fmap: a bound FixedPointMap (its x_T, noise, coefficients, block, reducer); X_star (rows, B, ...).
    """
    fmap: FixedPointMap
    X_star: torch.Tensor
    cache: Optional[torch.Tensor] = field(default=None, repr=False)

    def eps_cotangent(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g (rows, B, ...) -> (u, w), both (q1 - q0, B, ...) on the block's term rows.

        u_q = sum_{r <= q} s_r g_r: this block's prefix sums plus the carry of the earlier blocks
        (zero in one process). Term row q0 = start - 1 of a block that does not hold x_0 has no
        state of its own below it: its u is the carry alone.
        """
        fm = self.fmap
        weighted = fm.row_shape(fm._scale) * g
        prefix = weighted.cumsum(0)
        if not fm.block.is_first:
            prefix = torch.cat([torch.zeros_like(prefix[:1]), prefix])
        u = prefix[:fm.q1 - fm.q0] + fm.reducer.carry_from_earlier(weighted.sum(0, keepdim=True))
        return u, fm.row_shape(fm._c) * u

    def transposed(self, g: torch.Tensor, first: int = 1, max_batch: Optional[int] = None) -> torch.Tensor:
        """J^T g (rows, B, ...), evaluating the network only for the states x_j, j >= first (global;
        the states below reuse the cached products of the previous call: their inputs w_{j-1} no
        longer change)."""
        fm, start = self.fmap, self.fmap.block.start
        _, w = self.eps_cotangent(g)
        lo = max(first, start, 1)                       # global states with a fresh product
        q = slice(lo - 1 - fm.q0, fm.q_states - fm.q0)  # their term rows
        fresh, _ = eps_vjp(fm.model, self.X_star[lo - start:], fm._timesteps[q], w[q], max_batch=max_batch)
        # x_0 is read by no state: its row of J^T g stays zero.
        out = torch.zeros_like(g) if self.cache is None else self.cache.clone()
        out[lo - start:] = fresh
        self.cache = out
        return out


class AdjointMap:
    """G -> flip(v + J^T g) with g = flip(G): the adjoint fixed point in the solvers' row order
    (row r depends only on rows > r; solved with reversed_reducer across time shards).
    frozen_from = k (global, flipped) reuses the products of the flipped rows >= k, i.e. of the
    original states j <= T - 1 - k, which the solvers pass once those are settled."""

    def __init__(self, adjoint: ChainAdjoint, v: torch.Tensor, max_batch: Optional[int]):
        self.adjoint, self.v, self.max_batch = adjoint, v, max_batch
        self.calls = 0
        self.network_rows = 0

    def __call__(self, G: torch.Tensor, frozen_from: Optional[int] = None) -> torch.Tensor:
        fm = self.adjoint.fmap
        T, start = fm.T, fm.block.start
        first = 1 if frozen_from is None or self.adjoint.cache is None else max(1, T - min(frozen_from, T))
        self.calls += 1
        self.network_rows += max(0, fm.block.stop - max(first, start, 1))
        return (self.v + self.adjoint.transposed(G.flip(0), first, self.max_batch)).flip(0)


def solve_adjoint(fmap: FixedPointMap, X_star: torch.Tensor, v: torch.Tensor,
                  settings: dict[str, Any], max_batch: Optional[int]) -> tuple[torch.Tensor, SolverStats]:
    """g = J^T g + v at X* (rows, B, ...), started at g = v. Returns (g, the adjoint solve's stats)."""
    if settings["solver"] == SWEEP:
        return sweep_adjoint(fmap, X_star, v, max_batch)
    adjoint_map = AdjointMap(ChainAdjoint(fmap, X_star), v, max_batch)
    options = {k: val for k, val in settings.items() if k != "solver"}
    if "max_iter" in option_defaults(settings["solver"]):
        options.setdefault("max_iter", fmap.T)
    G, stats = solve(settings["solver"], adjoint_map, v.flip(0).clone(),
                     reducer=reversed_reducer(fmap.reducer), **options)
    stats.network_rows = int(fmap.reducer.sum(torch.tensor(float(adjoint_map.network_rows),
                                                           dtype=torch.float64, device=v.device)))
    return G.flip(0), stats


def sweep_adjoint(fmap: FixedPointMap, X_star: torch.Tensor, v: torch.Tensor,
                  max_batch: Optional[int]) -> tuple[torch.Tensor, SolverStats]:
    """The adjoint by forward substitution: g_0 = v_0, then g_j = v_j + (J^T g)_j from rows < j.
    One process only (check_sweep)."""
    fm, T = fmap, fmap.T
    g = v.clone()
    u = torch.zeros_like(v[0])                       # running sum_{r < j} s_r g_r
    for j in range(1, T):
        u = u + fm._scale[j - 1] * g[j - 1]
        grad, _ = eps_vjp(fm.model, X_star[j:j + 1], fm._timesteps[j - 1:j], (fm._c[j - 1] * u)[None],
                          max_batch=max_batch)
        g[j] = v[j] + grad[0]
    return g, SolverStats(iterations=T - 1, converged=True, network_rows=T - 1)


def sweep_gradients(fmap: FixedPointMap, X_star: torch.Tensor, v: torch.Tensor,
                    params: Sequence[torch.Tensor], max_batch: Optional[int]
                    ) -> tuple[torch.Tensor, SolverStats, torch.Tensor, Optional[torch.Tensor],
                               list[Optional[torch.Tensor]]]:
    """The sweep adjoint and chain_vjp in one pass: (g, stats, grad x_T, grad noise, grad params).

    When the sweep reaches state x_j it has the final cotangent w_{j-1} = c_{j-1} u_{j-1} of eps(x_j)
    (u_{j-1} sums rows < j of g, all exact by then), which is the cotangent chain_vjp gives that
    state. So one network vector-Jacobian product per state, to the state and to the weights
    together, replaces the sweep's products to the states followed by chain_vjp's second pass over
    the same states: T network rows per image with weight gradients instead of 2T - 1.
    One process only (check_sweep).
    """
    fm, T = fmap, fmap.T
    g = v.clone()
    u = torch.zeros_like(v)                          # u[q] = sum_{r <= q} s_r g_r
    grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
    grad_x_T = torch.zeros_like(v[0])
    for j in range(1, T + 1):                        # state x_j; j = T is x_T itself
        u[j - 1] = (u[j - 2] if j > 1 else 0) + fm._scale[j - 1] * g[j - 1]
        state = X_star[j] if j < T else fm.x_T
        grad, grads = eps_vjp(fm.model, state[None], fm._timesteps[j - 1:j], (fm._c[j - 1] * u[j - 1])[None],
                              params, max_batch)
        for k, gp in enumerate(grads):
            if gp is not None:
                grad_params[k] = gp if grad_params[k] is None else grad_params[k] + gp
        if j < T:
            g[j] = v[j] + grad[0]
        else:
            grad_x_T = u[T - 1] / fm._scale_T + grad[0]
    grad_noise = None if fm.noise is None else fm.row_shape(fm._d) * u
    return g, SolverStats(iterations=T - 1, converged=True, network_rows=T), grad_x_T, grad_noise, grad_params


def check_sweep(settings: dict[str, Any], fmap: FixedPointMap) -> None:
    if settings["solver"] == SWEEP and fmap.reducer.shards > 1:
        raise ValueError("the adjoint 'sweep' solves the rows one after another and cannot be split "
                         "over time shards: use the default adjoint (picard, tol 0), whose T calls "
                         "each evaluate all shards at once")


def chain_vjp(fmap: FixedPointMap, X_star: torch.Tensor, g: torch.Tensor,
              params: Sequence[torch.Tensor], max_batch: Optional[int]
              ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[Optional[torch.Tensor]]]:
    """(dh/dx_T)^T g, (dh/dxi)^T g (None without noise; the block's term rows) and (dh/dtheta)^T g
    at X*, by the formulas of the module header; the network's products over the block's states
    (x_T on the last block) in row chunks. Across time shards each is this block's part: sum them
    over the shards (x_T's is zero but for its u-term on the last block)."""
    fm = fmap
    u, w = ChainAdjoint(fmap, X_star).eps_cotangent(g)
    start = fm.block.start
    states = X_star[fm.q0 + 1 - start:fm.q_states + 1 - start]
    if fm.block.is_last:
        states = torch.cat([states, fm.x_T[None]])
    grad_states, grad_params = eps_vjp(fm.model, states, fm._timesteps, w, params, max_batch)
    if fm.block.is_last:
        grad_x_T = u[-1] / fm._scale_T + grad_states[-1]
    else:
        grad_x_T = torch.zeros_like(fm.x_T)
    grad_noise = None if fm.noise is None else fm.row_shape(fm._d) * u
    return grad_x_T, grad_noise, grad_params


# ---- the switch ------------------------------------------------------------------------------
class _ImplicitChain(torch.autograd.Function):
    """Value X*; backward: the IFT gradient to x_T, the injected noise and the network's parameters.

    The parameters are explicit inputs so that autograd routes their gradient (and the optimizer
    sees it in .grad) without holding any graph between forward and backward.
    """

    @staticmethod
    def forward(ctx, spec: dict[str, Any], X_star: torch.Tensor, x_T: torch.Tensor,
                noise: Optional[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.spec = spec
        ctx.has_noise = noise is not None
        ctx.noise_rows = None if noise is None else noise.shape[0]
        ctx.save_for_backward(X_star)
        ctx.params = params
        return X_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, v: torch.Tensor):
        spec = ctx.spec
        (X_star,) = ctx.saved_tensors
        fmap = spec["fmap"]   # the forward's map: bound to (detached) x_T and noise, coefficients cast
        if spec["adjoint"]["solver"] == SWEEP:    # adjoint and products in one pass over the states
            g, stats, grad_x_T, grad_noise, grad_params = sweep_gradients(fmap, X_star, v, ctx.params,
                                                                          spec["max_batch"])
        else:
            g, stats = solve_adjoint(fmap, X_star, v, spec["adjoint"], spec["max_batch"])
            grad_x_T, grad_noise, grad_params = chain_vjp(fmap, X_star, g, ctx.params, spec["max_batch"])
        if spec["on_backward"] is not None:
            spec["on_backward"](stats)
        if not ctx.needs_input_grad[2]:
            grad_x_T = None
        if not ctx.has_noise or not ctx.needs_input_grad[3]:
            grad_noise = None
        elif ctx.noise_rows != grad_noise.shape[0]:      # all T rows given, this block's rows used
            full = grad_noise.new_zeros((ctx.noise_rows,) + tuple(grad_noise.shape[1:]))
            full[fmap.q0:fmap.q1] = grad_noise
            grad_noise = full
        return (None, None, grad_x_T, grad_noise, *grad_params)


def ift_gradient(fmap: FixedPointMap, X_star: torch.Tensor, x_T: torch.Tensor,
                 noise: Optional[torch.Tensor], adjoint: Optional[dict[str, Any]] = None,
                 on_backward: Optional[Callable[[SolverStats], None]] = None) -> torch.Tensor:
    """X* (rows, B, ...) with the exact implicit gradient attached (to x_T, noise, trainable weights).

    on_backward(stats) receives the adjoint solve's statistics when backward runs. Across time
    shards the adjoint is solved over all shards (a collective in backward: every shard must call
    backward); the gradients of x_T and of the weights are then this shard's parts (summed over
    the shards as for onestep).
    """
    params = [p for p in fmap.model.parameters() if p.requires_grad]
    settings = adjoint_settings(adjoint)
    check_sweep(settings, fmap)
    spec = {"fmap": fmap, "max_batch": fmap.max_batch, "adjoint": settings, "on_backward": on_backward}
    return _ImplicitChain.apply(spec, X_star.detach(), x_T, noise, *params)


def onestep_gradient(fmap: FixedPointMap, X_star: torch.Tensor, x_T: torch.Tensor,
                     noise: Optional[torch.Tensor], tau: float) -> torch.Tensor:
    """The paper's 1-step gradient: (1 - tau) X* + tau h(X*; x_T), X* held fixed (rows, B, ...).

    Trainable weights: every state's eps carries a gradient (one batched call with a graph).
    Frozen weights (inversion): the eps of x_1..x_{T-1} carry none with X* detached, so the
    solver's last cached eps are reused and only eps(x_T) is evaluated with autograd: one network
    row per image instead of T; across time shards the carry passes its gradient to the other
    blocks. The value is then f(X_last), which is what the solver returned.
    fmap: the map the solver used (bound, cache filled).
    """
    X_star = X_star.detach()
    grad_map = fmap.like().bind(x_T, noise)
    if any(p.requires_grad for p in fmap.model.parameters()):
        h = grad_map(X_star)
    else:
        top = [] if grad_map.top_eps() is None else [grad_map.top_eps()[None]]
        h = grad_map.states_from_eps(torch.cat([fmap.cached_eps(), *top]))
    return (1 - tau) * X_star + tau * h


def attach_gradient(grad: str, fmap: FixedPointMap, X_star: torch.Tensor, x_T: torch.Tensor,
                    noise: Optional[torch.Tensor] = None, *, tau: float = 0.1,
                    adjoint: Optional[dict[str, Any]] = None,
                    on_backward: Optional[Callable[[SolverStats], None]] = None) -> torch.Tensor:
    """The solver's X* (T, B, ...) with gradient mode `grad` attached (backward_factory's role).

    'none': X* as it is; 'onestep': the damped step; 'ift': the exact implicit gradient.
    fmap: the map the solver used (bound to x_T; its cache is read by the frozen-network step).
    """
    check_grad_mode(grad, tau)
    if grad == "none" or not torch.is_grad_enabled():
        return X_star
    if grad == "onestep":
        return onestep_gradient(fmap, X_star, x_T, noise, tau)
    return ift_gradient(fmap, X_star, x_T, noise, adjoint, on_backward)
