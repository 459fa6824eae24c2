"""Exact inversion: the whole inverse DDIM chain as one fixed point over all T states.

Unrolling the inverse step (diffusion/inverse.py, Eq. 1) from the clean x_0 gives the mirror image
of the forward map (fixed_point.py, paper Eq. 10):
    x_i = sqrt(abar_i) (y_0 - sum_{j = 1..i} [c_j eps(x_j, s_{j-1}) + d_j xi_j]),   i = 1..T,   (3)
with y_0 = x_0 / sqrt(abar_0). Every state depends on x_0 and on the noise predictions at itself
and all earlier states through one inclusive cumulative sum, so one evaluation of the map is one
batched network call over all T states. Written row to row instead (x_i from x_{i-1} only), a
correction travels one row per iteration; in the cumulative-sum form it reaches every later state
at once (measured: at T = 100 plain iteration made no progress in 40 iterations row to row).

Row order: the unknown X holds x_T, x_{T-1}, ..., x_1 (row r = x_{T-r}), so that row r depends on
rows >= r, the structure that solvers.triangular_anderson's reverse cumulative sum of Gram matrices
assumes (row r's least squares sums the rows it depends on). Unlike the forward chain, every row
depends on itself too, so the solvers run with triangular=False: no row is exact after a known
number of calls. Each row converges when every step's map is a contraction,
|c_i| sqrt(abar_i) Lip(eps) < 1 (inverse.py, Eq. 2).

`exact_invert` is the entry point for both modes (per step, or all timesteps at once); its report
says, per image and per state, how far from the fixed point the result is.

Measured on the shipped faces model (bench/exact_inversion.py, median PSNR of the regenerated
faces): at T = 10 the second step (t = 0 -> 100) is barely a contraction, so per-step Anderson
(about 8 iterations a step to tol 1e-5, ~100 dB) converges where per-step plain iteration stalls.
Over all timesteps (16 faces), triangular Anderson (m = 3) leads at T = 10 from the DDIM start
(46.0 / 53.1 / 63.4 dB after 8 / 10 / 12 calls; plain iteration 34.7 / 40.0 / 45.2). At T = 100 the
extrapolated start (second-order DDIM inversion, the same T calls) with plain iteration leads:
60.1 / 64.1 / 76.0 dB after 6 / 8 / 12 calls, against 55.9 after 8 from the DDIM start.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from deqlit.deq.fixed_point import NoiseModel, batched_eps
from deqlit.deq.inversion_report import (InversionNotConverged, InversionReport, condition_text,
                                         failure_message)
from deqlit.deq.solvers import SolverDivergedError, get_solver, option_defaults, solve
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.inverse import (check_noise, contraction_factors, ddim_inversion_states,
                                      extrapolated_inversion_states,
                                      invert_per_step)
from deqlit.deq.blocks import Block, all_rows, block_of
from deqlit.deq.reduce import LOCAL, LocalReducer

MODES = ("all-timesteps", "per-step")
INITS = ("ddim", "extrapolated", "gaussian")
DEFAULT_MAX_ITER = {"all-timesteps": 50, "per-step": 20}   # calls in all; calls per step
# Anderson history over all timesteps: m = 3 beat the solvers' default 5 on the shipped faces model
# (median PSNR after 8 calls from the DDIM start: T = 10, 16 faces 46.0 vs 44.8 dB; T = 100, 4 faces
# 50.0 vs 45.1 dB). Per step (one state) the solvers' own defaults are kept.
ALL_TIMESTEP_HISTORY = 3


class InverseChainMap:
    """G(X; x_0) of Eq. 3 for one chain and one batch of clean images x0 (B, C, H, W), on the rows
    [start, stop) of X = (x_T, ..., x_1) (global row indices; `block` None: the whole chain).

    X and G(X) hold the block's rows (rows, B, C, H, W). Counts `calls` (batched network calls)
    and `network_rows` (eps evaluations per image); `row_trace` keeps, per call, the relative
    residual ||G(X) - X|| / (1e-5 + ||G(X)||) of every (state, image) of the block, (rows, B) in
    natural order. `frozen_from = k` (the solvers' freeze option, global): rows >= k, i.e.
    x_{T-k}..x_1, reuse the eps of the last call.
    On a time shard's block, a block needs the terms of all earlier
    states, the rows of the later blocks: the reducer's `carry_from_later` of its block total.
    noise xi holds all T rows x_1..x_T on every shard; each keeps its own.
    """

    def __init__(self, model: NoiseModel, chain: Chain, x0: torch.Tensor,
                 noise: Optional[torch.Tensor] = None, max_batch: Optional[int] = None,
                 block: Optional[Block] = None, reducer: LocalReducer = LOCAL):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (rows per network call) or None, got {max_batch}")
        block = block_of(chain.T, 1, 0) if block is None else block
        if block.T != chain.T:
            raise ValueError(f"the block splits a {block.T}-step chain but the chain has T = {chain.T}")
        check_noise(chain, x0, noise)
        self.model, self.chain, self.block, self.max_batch = model, chain, block, max_batch
        self.reducer, self.T = reducer, chain.T
        # The block's states in natural order: x_{n+1} for n in [T - stop, T - start).
        self.natural = slice(chain.T - block.stop, chain.T - block.start)
        dtype, device = x0.dtype, x0.device
        view = (block.rows,) + (1,) * x0.dim()
        scale = chain.abar.sqrt().to(device=device, dtype=dtype)              # (T+1,) of x_0..x_T
        self._scale = scale[1:][self.natural].reshape(view)
        self._c = chain.c.to(device=device, dtype=dtype)[self.natural].reshape(view)
        self._y0 = x0 / scale[0]
        self._noise_terms = None
        if noise is not None and chain.eta > 0:
            d = chain.d.to(device=device, dtype=dtype)[self.natural].reshape(view)
            self._noise_terms = d * noise[self.natural]
        self._timesteps = chain.timestep_tensor(device)[self.natural]       # network time
        self._eps = torch.zeros((block.rows,) + tuple(x0.shape), dtype=dtype, device=device)
        self.calls, self.network_rows = 0, 0
        self.rows_after_call: list[int] = []
        self.row_trace: list[torch.Tensor] = []

    def states_from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """eps of the block's states (natural order, (rows, B, ...)) -> its states of Eq. 3."""
        terms = self._c * eps
        if self._noise_terms is not None:
            terms = terms + self._noise_terms
        carry = self.reducer.carry_from_later(terms.sum(0, keepdim=True))   # all earlier states
        return self._scale * (self._y0[None] - (terms.cumsum(0) + carry))  # inclusive: j <= i

    def scan_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The chain's structure for newton_scan.py, per solver row r = x_{T-r} of the block:
        (sqrt(abar_{T-r}) (rows,), the weight -c_{T-r-1} of x_{T-r}'s eps in the states (rows,),
        True: a state's own eps enters it, Eq. 3), float64 on the CPU."""
        scale = self.chain.abar.double().sqrt()[1:][self.natural].flip(0)
        return scale, -self.chain.c.double()[self.natural].flip(0), True

    def row_states(self) -> torch.Tensor:
        """The chain state x_i of every solver row of the block (x_{T-r}): i (rows,) long."""
        return (torch.arange(self.natural.start, self.natural.stop) + 1).flip(0)

    def row_eps(self) -> torch.Tensor:
        """eps of the block's states at the last call, in solver order (rows, B, ...)."""
        return self._eps.flip(0)

    def __call__(self, X: torch.Tensor, frozen_from: Optional[int] = None) -> torch.Tensor:
        if X.shape[0] != self.block.rows:
            raise ValueError(f"X must hold the {self.block.rows} rows {self.block.start}.."
                             f"{self.block.stop - 1} of the states x_T..x_1, got {X.shape[0]} rows")
        states = X.flip(0)                                               # natural order
        # Global rows >= k are the natural states x_1..x_{T-k}: here the first stop - k of the block.
        kept = 0 if frozen_from is None else max(0, min(self.block.stop - frozen_from, self.block.rows))
        fresh = batched_eps(self.model, states[kept:], self._timesteps[kept:], self.max_batch)
        self._eps[kept:] = fresh
        self.calls += 1
        self.network_rows += self.block.rows - kept
        self.rows_after_call.append(self.network_rows)
        out = self.states_from_eps(self._eps)
        diff = (out - states).double().flatten(2).norm(dim=-1)             # (rows, B)
        self.row_trace.append(diff / (1e-5 + out.double().flatten(2).norm(dim=-1)))
        return out.flip(0)


def gaussian_start(x0: torch.Tensor, chain: Chain) -> torch.Tensor:
    """States x_1..x_T (T, B, C, H, W) of the DDIM flow of Gaussian data with each image's own
    mean mu and variance s^2: x_i = sqrt(abar_i) mu + sqrt(abar_i s^2 + 1 - abar_i) (x_0 - mu) / s,
    exact for Gaussian data (warm_start.py). No network call: a start of sequential depth 0."""
    abar = chain.abar[1:].to(device=x0.device, dtype=x0.dtype).reshape((-1,) + (1,) * x0.dim())
    mu = x0.mean(dim=(1, 2, 3), keepdim=True)
    var = x0.var(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
    return abar.sqrt() * mu + (abar * var + 1 - abar).sqrt() * ((x0 - mu) / var.sqrt())[None]


def chunked(model: NoiseModel, max_batch: Optional[int]) -> NoiseModel:
    """The model called on at most max_batch images at a time (same results)."""
    if max_batch is None:
        return model
    return lambda x, t: batched_eps(model, x[None], t[:1], max_batch)[0]


def exact_invert(model: NoiseModel, x0: torch.Tensor, chain: Chain, *, mode: str = "all-timesteps",
                 solver: str = "triangular-anderson", max_iter: Optional[int] = None,
                 tol: float = 1e-5, noise: Optional[torch.Tensor] = None,
                 max_batch: Optional[int] = None, init: Union[str, torch.Tensor] = "ddim",
                 on_fail: str = "raise", reducer: LocalReducer = LOCAL, **solver_options
                 ) -> tuple[torch.Tensor, torch.Tensor, InversionReport]:
    """The latent x_T from which the DDIM chain regenerates x0, found as a fixed point.

    x0 (B, C, H, W) clean images in the model's scale; noise xi (T, B, C, H, W), required when
    chain.eta > 0 (held fixed: regenerate with ddim_sample(model, x_T, chain, noise=xi)).
    mode 'all-timesteps': Eq. 3 over x_1..x_T at once; max_iter counts batched calls of the solver
      (default 50). init: 'ddim' (plain DDIM inversion, T sequential calls), 'extrapolated'
      (second-order DDIM inversion, the same T calls; the better start at large T), 'gaussian' (no call)
      or a tensor (T, B, C, H, W) of states x_1..x_T.
    mode 'per-step': Eq. 1 for x_1, then x_2, ...; max_iter is per step (default 20), each step
      started from its DDIM-inversion guess.
    tol: relative residual per image (all-timesteps: over all states; per-step: every step's).
    on_fail 'raise' raises InversionNotConverged (carrying the report) when an image misses tol;
    'return' returns with report.converged False. NaN/Inf raises SolverDivergedError.
    solver_options go to the solver (m, lam, beta, relative_lam, freeze; see solvers.py).
    reducer: a time group's DistributedReducer (deqlit/parallel) splits the all-timesteps solve's
      rows over its processes (x0 and noise the same on all); states are then this process's rows.
    Returns (x_T (B, C, H, W), states (T, B, C, H, W) = x_1..x_T, report).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if on_fail not in ("raise", "return"):
        raise ValueError(f"on_fail must be 'raise' or 'return', got {on_fail!r}")
    get_solver(solver)                                   # unknown names fail before any work
    if "triangular" in solver_options:
        raise TypeError("triangular is set by exact_invert (False: every inverse row depends on itself)")
    if mode == "per-step" and reducer.shards > 1:
        raise ValueError("exact inversion per step is sequential over the timesteps and cannot be "
                         "split over time shards: use mode all-timesteps (--inversion.exact.mode "
                         "all-timesteps), or time_shards 1 to split the images instead")
    if mode == "per-step" and solver == "newton-scan":
        raise ValueError("newton-scan solves the all-timestep chain (--inversion.exact.mode "
                         "all-timesteps); a step of mode per-step has one state: use anderson or picard")
    if mode == "per-step" and solver_options.get("freeze"):
        raise ValueError("freeze applies to the all-timesteps solve only (a step has one state)")
    check_noise(chain, x0, noise)
    max_iter = DEFAULT_MAX_ITER[mode] if max_iter is None else int(max_iter)
    options = dict(max_iter=max_iter, tol=tol, triangular=False, **solver_options)
    if mode == "all-timesteps" and "m" in option_defaults(solver):     # Anderson's history
        options.setdefault("m", ALL_TIMESTEP_HISTORY)
    factors = contraction_factors(chain).tolist()
    try:
        with torch.no_grad():
            if mode == "per-step":
                states, report = _per_step(model, x0, chain, solver, options, noise, max_batch)
                x_T = states[-1]
            else:
                x_T, states, report = _all_timesteps(model, x0, chain, solver, options, noise,
                                                     max_batch, init, reducer)
    except SolverDivergedError as err:
        raise SolverDivergedError(f"exact inversion ({mode}): {err}. {condition_text(chain)}") from err
    report.mode, report.solver, report.tol, report.contraction = mode, solver, tol, factors
    report.timesteps = list(chain.timesteps)
    report.finalize(tol)
    if not report.converged and on_fail == "raise":
        raise InversionNotConverged(failure_message(report, max_iter), report)
    return x_T, states, report


def _per_step(model, x0, chain, solver, options, noise, max_batch):
    def solve_state(f, x_start):
        return solve(solver, f, x_start, **options)

    states, stats, calls = invert_per_step(chunked(model, max_batch), x0, chain, solve_state, noise)
    rows = [s.image_residual for s in stats]                          # [state][image]
    B = x0.shape[0]
    report = InversionReport(
        row_residual=rows,
        image_residual=[max(r[b] for r in rows) for b in range(B)],
        image_iterations=[sum(s.image_iterations[b] for s in stats) for b in range(B)],
        network_evals=[sum(1 + s.image_iterations[b] for s in stats) for b in range(B)],
        depth=sum(calls), start_depth=chain.T,
        state_trace=[list(s.rel_residual) for s in stats])
    return states, report


def start_states(model: NoiseModel, x0: torch.Tensor, chain: Chain, noise: Optional[torch.Tensor],
                 max_batch: Optional[int], init: Union[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The all-timestep solve's start: (states x_1..x_T (T, B, C, H, W), its sequential depth in
    network calls). init 'ddim', 'extrapolated' (T calls each), 'gaussian' (none) or a tensor."""
    T = chain.T
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (T,) + tuple(x0.shape):
            raise ValueError(f"init must hold the states x_1..x_T, shape {(T,) + tuple(x0.shape)}, "
                             f"got {tuple(init.shape)}")
        return init.to(x0), 0
    if init == "ddim":
        return ddim_inversion_states(chunked(model, max_batch), x0, chain, noise), T
    if init == "extrapolated":
        return extrapolated_inversion_states(chunked(model, max_batch), x0, chain, noise), T
    if init == "gaussian":
        return gaussian_start(x0, chain), 0
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)} or pass the "
                     f"states x_1..x_T as a tensor")


def _all_timesteps(model: NoiseModel, x0: torch.Tensor, chain: Chain, solver: str, options: dict,
                   noise: Optional[torch.Tensor], max_batch: Optional[int],
                   init: Union[str, torch.Tensor], reducer: LocalReducer
                   ) -> tuple[torch.Tensor, torch.Tensor, InversionReport]:
    """Eq. 3 solved on the reducer's block of rows (all T in one process; x0 and noise the same on
    every shard).

    Returns (x_T (B, C, H, W) on every shard, this block's states in natural order (rows, B, ...),
    the report of the whole chain, the same on every shard). init as in start_states; a tensor may
    hold all T states x_1..x_T or this block's.
    """
    T = chain.T
    block = block_of(T, reducer.shards, reducer.shard_index)
    natural = slice(T - block.stop, T - block.start)
    if isinstance(init, torch.Tensor) and init.shape[0] == block.rows and block.rows != T:
        if tuple(init.shape) != (block.rows,) + tuple(x0.shape):
            raise ValueError(f"init must hold the states x_1..x_T, shape {(T,) + tuple(x0.shape)}, "
                             f"or this block's {block.rows}, got {tuple(init.shape)}")
        start, start_depth = init.to(x0), 0
    elif isinstance(init, str) and init == "ddim":     # block-sized memory
        start, start_depth = ddim_inversion_states(chunked(model, max_batch), x0, chain, noise, natural), T
    else:                                              # all T states; keep this block's
        states, start_depth = start_states(model, x0, chain, noise, max_batch, init)
        start = states[natural]
    G = InverseChainMap(model, chain, x0, noise, max_batch, block=block, reducer=reducer)
    X, stats = solve(solver, G, start.flip(0).contiguous(), reducer=reducer, **options)
    stop = stats.image_iterations                                      # the same on every shard
    B = x0.shape[0]
    at_stop = torch.stack([G.row_trace[stop[b] - 1][:, b] for b in range(B)], dim=1)   # (rows, B)
    # Solver order (x_T..x_1) is the shard order; the report's rows are natural (x_1..x_T).
    rows = all_rows(at_stop.flip(0), T, reducer).flip(0)                             # (T, B)
    evals = reducer.sum(torch.tensor([float(G.rows_after_call[stop[b] - 1]) for b in range(B)],
                                     dtype=torch.float64, device=x0.device))
    # Each state's worst image per call, (T, calls) natural order: the curves of the solve.
    trace = torch.stack(G.row_trace).amax(-1).T                                      # (rows, calls)
    trace = all_rows(trace.flip(0).contiguous(), T, reducer).flip(0)
    report = InversionReport(
        row_residual=rows.tolist(),
        image_residual=list(stats.image_residual),
        image_iterations=list(stop),
        network_evals=[start_depth + int(round(float(e))) for e in evals],
        depth=start_depth + stats.iterations, start_depth=start_depth,
        state_trace=trace.tolist(), call_trace=list(stats.rel_residual))
    # Row 0 of X is x_T, on the first block.
    x_T = reducer.broadcast_from(X[0] if block.is_first else torch.empty_like(X[0]), 0)
    return x_T, X.flip(0), report
