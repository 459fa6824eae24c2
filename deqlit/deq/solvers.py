"""Fixed-point solvers for X = f(X) over a triangular system of T timestep rows.

A solver is a plain function `solver(f, x0, *, max_iter, tol, ...) -> (X, SolverStats)` chosen by
name from SOLVERS. X has shape (T, B, ...): row 0 is the clean x_0, row T-1 the state next to x_T.
Row i depends only on rows > i, so one plain (Picard) step makes the next row exact: after n calls
of f the rows >= T - n are exact whatever the start. Every solver here keeps that guarantee by
taking the plain update on the settled rows, so each reaches the exact fixed point within T calls
(and stops there); acceleration is applied to the rows that are not settled yet.

The solvers never log or print; `callback(n, stats, fx)` lets callers watch progress (fx is
the consistent iterate f(X) of call n).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from deqlit.deq.newton_scan import newton_scan
from deqlit.deq.reduce import LOCAL, LocalReducer

Map = Callable[..., torch.Tensor]


class SolverDivergedError(FloatingPointError):
    """The iteration produced NaN or Inf."""


@dataclass
class SolverStats:
    """What one solve did. Filled as tensors during the solve and turned into Python numbers once
    at its end (`finish`), so that the loop itself reads one flag per iteration from the device.

    Residuals are per image: ||f(X)_b - X_b|| / (1e-5 + ||f(X)_b||) over all rows of image b; the
    traces hold the worst image per call.
    """
    iterations: int = 0                      # calls of f
    converged: bool = False
    abs_residual: list[float] = field(default_factory=list)   # max_b ||f(X)_b - X_b|| per call
    rel_residual: list[float] = field(default_factory=list)   # max_b relative residual per call
    row_residual: list[float] = field(default_factory=list)   # per timestep row, last call
    image_residual: list[float] = field(default_factory=list)  # per image, at its stop
    image_iterations: list[int] = field(default_factory=list)  # per image: calls until it stopped
    network_rows: int = 0                    # eps evaluations per image (filled by the caller)
    # The solve reached call T of a triangular system: every row is exact whatever the last
    # residual says (that residual measures the final update, not an error of the result).
    exact_by_depth: bool = False
    abs_trace: list[torch.Tensor] = field(default_factory=list, repr=False)   # (B,) per call
    rel_trace: list[torch.Tensor] = field(default_factory=list, repr=False)   # (B,) per call

    @property
    def final_residual(self) -> float:
        return self.rel_residual[-1] if self.rel_residual else math.inf

    def last_rel(self) -> float:
        """The worst image's relative residual of the last call (a host sync: for progress bars)."""
        return float(self.rel_trace[-1].max()) if self.rel_trace else math.inf

    def finish(self, row_rel: Optional[torch.Tensor], image_rel: torch.Tensor,
               image_iterations: torch.Tensor) -> None:
        if self.abs_trace:
            self.abs_residual = torch.stack(self.abs_trace).amax(1).tolist()
            self.rel_residual = torch.stack(self.rel_trace).amax(1).tolist()
        if row_rel is not None:
            self.row_residual = row_rel.tolist()
        self.image_residual = image_rel.tolist()
        self.image_iterations = [int(n) for n in image_iterations.tolist()]


def residuals(fx: torch.Tensor, x: torch.Tensor, reducer: LocalReducer
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's residual ||f(X) - X|| / (1e-5 + ||f(X)||), per image over all rows.

    fx, x (T, B, ...) -> (absolute (B,), relative (B,), per-row relative over all images (T,)),
    float64 tensors on fx's device (no host sync).
    """
    diff_sq = (fx - x).double().pow(2).flatten(2).sum(-1)   # (T, B)
    fx_sq = fx.double().pow(2).flatten(2).sum(-1)            # (T, B)
    # One reduction over the time shards for both sums (a plain sum in one process).
    image_diff, image_fx = reducer.sum(torch.stack([diff_sq.sum(0), fx_sq.sum(0)])).sqrt().unbind(0)  # (B,)
    row_rel = diff_sq.sum(1).sqrt() / (1e-5 + fx_sq.sum(1).sqrt())
    return image_diff, image_diff / (1e-5 + image_fx), row_rel


def divergence_message(solver: str, iteration: int) -> str:
    if iteration == 1:
        return (f"{solver}: the noise network returned NaN/Inf at iteration 1, from finite inputs: "
                f"the model itself produces non-finite values (check the checkpoint's weights for "
                f"NaN, e.g. from a diverged training run, and that the inputs are in range)")
    return (f"{solver}: the fixed-point iterate became NaN/Inf at iteration {iteration} (the model "
            f"gave finite values at iteration 1). Try a smaller beta (damping, e.g. 0.5), a larger "
            f"lam (regularization, e.g. 1e-2), or solver='picard', which cannot diverge faster "
            f"than the sequential chain; also check that the model's outputs are finite in float32")


def check_inputs_finite(x0: torch.Tensor, solver: str, finite: Optional[bool] = None) -> None:
    """Raise unless x0 is finite (or, given, unless `finite`: the verdict of all time shards)."""
    if not (bool(torch.isfinite(x0).all()) if finite is None else finite):
        raise SolverDivergedError(f"{solver}: the starting point (x_T or the warm start) holds "
                                  f"NaN/Inf: fix the latents or noise before solving")


def shard_layout(x0: torch.Tensor, solver: str, reducer: LocalReducer) -> tuple[int, int, list[int]]:
    """(global row of x0's row 0, global T, rows of every shard) from one gather of the shards'
    row counts, which also checks that every shard's start is finite (so all shards raise)."""
    if reducer.shards == 1:
        check_inputs_finite(x0, solver)
        return 0, x0.shape[0], [x0.shape[0]]
    info = reducer.gather(torch.stack([torch.tensor(float(x0.shape[0]), dtype=torch.float64, device=x0.device),
                                       torch.isfinite(x0).all().double()])).tolist()
    check_inputs_finite(x0, solver, finite=all(finite for _, finite in info))
    sizes = [int(rows) for rows, _ in info]
    return sum(sizes[:reducer.shard_index]), sum(sizes), sizes


def settled_from_top(below: list[float], sizes: list[int]) -> int:
    """Rows counted from the global top (x_{T-1}) whose residuals are all below tol, from every
    shard's count of such rows from its own top (below) and its row count (sizes)."""
    total = 0
    for rows_below, rows in zip(reversed(below), reversed(sizes)):
        total += int(rows_below)
        if int(rows_below) < rows:
            break
    return total


def mixing_weights(gram: torch.Tensor, lam: float, relative_lam: bool) -> torch.Tensor:
    """Anderson weights alpha minimizing ||sum_k alpha_k g_k||^2 subject to sum_k alpha_k = 1.

    gram (..., n, n) float64 holds <g_k, g_l>. Solves the bordered system
    [[0, 1^T], [1, G G^T + lam I]] [nu, alpha] = [1, 0] (as the reference code does).
    With relative_lam the regularizer is lam * mean(diag): an absolute lam stops mixing and turns
    the step into plain averaging once residuals are small (seen at ~3e-3 on this project's model).
    Returns alpha (..., n).
    """
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    if relative_lam:
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None].clamp(min=1e-30)
        reg = lam * scale * eye
    else:
        reg = lam * eye
    system = torch.zeros(gram.shape[:-2] + (n + 1, n + 1), dtype=gram.dtype, device=gram.device)
    system[..., 0, 1:] = 1.0
    system[..., 1:, 0] = 1.0
    system[..., 1:, 1:] = gram + reg
    rhs = torch.zeros(gram.shape[:-2] + (n + 1, 1), dtype=gram.dtype, device=gram.device)
    rhs[..., 0, 0] = 1.0
    solution = torch.linalg.solve(system, rhs)[..., 1:, 0]
    return torch.nan_to_num(solution, nan=1.0 / n)


def per_row_gram(residual_history: list[torch.Tensor]) -> torch.Tensor:
    """History of residuals, each (T, B, ...), -> per-(row, image) Gram (T, B, n, n) in float64."""
    g = torch.stack([r.flatten(2).double() for r in residual_history], dim=2)  # (T, B, n, D)
    return g @ g.transpose(-1, -2)


def _run(name: str, f: Map, x0: torch.Tensor, *, max_iter: int, tol: float,
         mix: Optional[Callable[[list, list, torch.Tensor], torch.Tensor]], m: int,
         freeze: bool, reducer: LocalReducer, triangular: bool,
         callback: Optional[Callable[[int, SolverStats, torch.Tensor], None]]) -> tuple[torch.Tensor, SolverStats]:
    """The loop shared by all solvers. `mix(xs, fxs, gs) -> X_next` or None for plain iteration.

    Every image stops on its own: once image b's residual is below tol, its result is f(X)_b of
    that call, exactly what a solve of image b alone returns (Anderson's weights are per image,
    so images interact only through when the loop stops). Results thus do not depend on the batch
    size or on which images share a batch. The loop reads one small flag vector per call from the
    device (all stopped? finite? rows to freeze?): the least a data-dependent stop needs.

    triangular=True: row r depends only on rows > r (the forward chain), so after n calls the rows
    >= T - n are exact; settled rows take the plain update and the solve ends at n = T.
    triangular=False: rows may depend on themselves (the inverse chain); no such guarantee.

    Sharded over time (reducer.shards > 1; deqlit/parallel), x0 and f work on this shard's block
    of rows; f takes global row indices (frozen_from), residuals are summed over the shards, and
    the stop, freeze and NaN flags are gathered once per call so that every shard decides alike.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    # Sharded over time (reducer.shards > 1), x0 holds this shard's rows start..start + T_local - 1
    # of the global T; stopping, freezing and settled rows use global row indices.
    start, T, sizes = shard_layout(x0, name, reducer)
    T_local, B = x0.shape[0], x0.shape[1]
    image_view = (1, B) + (1,) * (x0.dim() - 2)
    stats = SolverStats()
    x = x0
    xs: list[torch.Tensor] = []
    fxs: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    frozen_from: Optional[int] = None
    out = x0.clone()
    done = torch.zeros(B, dtype=torch.bool, device=x0.device)
    stop_rel = torch.zeros(B, dtype=torch.float64, device=x0.device)
    stop_iter = torch.zeros(B, dtype=torch.long, device=x0.device)
    row_rel: Optional[torch.Tensor] = None
    for n in range(1, max_iter + 1):
        fx = f(x, frozen_from) if freeze else f(x)
        abs_res, rel_res, row_rel = residuals(fx, x, reducer)
        stats.iterations = n
        stats.abs_trace.append(abs_res)
        stats.rel_trace.append(rel_res)
        exact_now = triangular and n >= T            # every row of f(X) is exact at n = T
        stats.exact_by_depth = exact_now
        newly = ~done & ((rel_res < tol) | exact_now | (n == max_iter))
        out = torch.where(newly.reshape(image_view), fx, out)
        stop_rel = torch.where(newly, rel_res, stop_rel)
        stop_iter = torch.where(newly, torch.full_like(stop_iter, n), stop_iter)
        done = done | newly
        below = (row_rel < tol).flip(0).int().cumprod(0).sum() if freeze else torch.zeros((), device=x0.device)
        # One small gather per call (a plain read in one process): every shard takes the same
        # decisions, and a NaN on any shard stops all of them at the same iteration.
        flags = reducer.gather(torch.stack(
            [done.all().double(), torch.isfinite(fx).all().double(), below.double()])).tolist()
        all_done = all(flag[0] for flag in flags)
        finite = all(flag[1] for flag in flags)
        frozen_rows = settled_from_top([flag[2] for flag in flags], sizes)
        if not finite:
            raise SolverDivergedError(divergence_message(name, n))
        if callback is not None:
            callback(n, stats, fx)
        if all_done:
            break
        if freeze:
            # The network inputs of settled rows no longer change: reuse their eps. Rows whose own
            # residual is below tol and all of whose later rows are too are frozen as well.
            frozen_from = min(T - n + 1, T - int(frozen_rows)) if triangular else T - int(frozen_rows)
        if mix is None:
            x = fx
            continue
        xs.append(x)
        fxs.append(fx)
        gs.append(fx - x)
        if len(xs) > m:
            xs.pop(0), fxs.pop(0), gs.pop(0)
        x_next = mix(xs, fxs, gs)
        if triangular:
            settled = min(max(T - n - start, 0), T_local)   # local rows at global >= T - n: exact in fx
            x_next[settled:] = fx[settled:]
        x = x_next
    stats.converged = bool((stop_rel < tol).all()) or (triangular and stats.iterations >= T)
    stats.finish(row_rel, stop_rel, stop_iter)
    return out, stats


def _mix_with(weights: torch.Tensor, xs: list[torch.Tensor], fxs: list[torch.Tensor],
              beta: float) -> torch.Tensor:
    """X_next = beta * sum_k alpha_k f(X_k) + (1 - beta) * sum_k alpha_k X_k, alpha (T, B, n)."""
    a = weights.to(xs[0].dtype)
    shape = a.shape + (1,) * (xs[0].dim() - 2)
    a = a.reshape(shape)                                   # (T, B, n, 1, 1, 1)
    stacked_f = torch.stack(fxs, dim=2)                    # (T, B, n, ...)
    mixed_f = (a * stacked_f).sum(2)
    if beta == 1.0:
        return mixed_f
    mixed_x = (a * torch.stack(xs, dim=2)).sum(2)
    return beta * mixed_f + (1 - beta) * mixed_x


def check_mixing_options(m: int, lam: float, beta: float) -> None:
    if m < 1:
        raise ValueError(f"m (Anderson's history length) must be >= 1, got {m}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (Anderson's regularization) must be >= 0, got {lam}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta (Anderson's damping) must be in (0, 1], got {beta}")


def picard(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3, freeze: bool = False,
           reducer: LocalReducer = LOCAL, triangular: bool = True,
           callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Plain fixed-point iteration X <- f(X); exact after T calls on a triangular system."""
    return _run("picard", f, x0, max_iter=max_iter, tol=tol, mix=None, m=0, freeze=freeze,
                reducer=reducer, triangular=triangular, callback=callback)


def anderson(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3, m: int = 5,
             lam: float = 1e-3, beta: float = 1.0, relative_lam: bool = True, freeze: bool = False,
             reducer: LocalReducer = LOCAL, triangular: bool = True,
             callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration with weights solved per (timestep, image) row, as the reference does."""
    check_mixing_options(m, lam, beta)

    def mix(xs, fxs, gs):
        return _mix_with(mixing_weights(per_row_gram(gs), lam, relative_lam), xs, fxs, beta)
    return _run("anderson", f, x0, max_iter=max_iter, tol=tol, mix=mix, m=m, freeze=freeze,
                reducer=reducer, triangular=triangular, callback=callback)


def triangular_anderson(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3,
                        m: int = 5, lam: float = 1e-3, beta: float = 1.0, relative_lam: bool = True,
                        freeze: bool = False, reducer: LocalReducer = LOCAL, triangular: bool = True,
                        callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Triangular Anderson (ParaTAA, Tang et al. 2024): row t's least-squares problem sums the Gram
    matrices of all rows j >= t, i.e. of itself and every state that it depends on."""
    check_mixing_options(m, lam, beta)

    def mix(xs, fxs, gs):
        gram = per_row_gram(gs)                                           # (T, B, n, n)
        carry = reducer.carry_from_later(gram.sum(0, keepdim=True))       # later shards
        cumulative = gram.flip(0).cumsum(0).flip(0) + carry
        return _mix_with(mixing_weights(cumulative, lam, relative_lam), xs, fxs, beta)
    return _run("triangular-anderson", f, x0, max_iter=max_iter, tol=tol, mix=mix, m=m,
                freeze=freeze, reducer=reducer, triangular=triangular, callback=callback)


def sequential(f: Map, x0: torch.Tensor, *, reducer: LocalReducer = LOCAL, triangular: bool = True,
               callback=None) -> tuple[torch.Tensor, SolverStats]:
    """DDIM's chain one state after another, through the same map: call n evaluates the network on
    the state x_{T-n+1} only (made exact by call n - 1; x_T's eps comes with bind), so the rows
    >= T - n are exact after it, as under plain iteration, but each call costs one network row per
    image instead of all: T - 1 rows in all. The cheapest where network calls do not run in
    parallel (a CPU); it takes no options. Needs the forward map's `fresh_from` window.
    """
    if not triangular:
        raise ValueError("the sequential solver runs a triangular chain (the forward DDIM chain); "
                         "use picard, anderson or triangular-anderson here")
    _, T, _ = shard_layout(x0, "sequential", reducer)
    stats = SolverStats()
    x = x0
    row_rel = None
    for n in range(1, T + 1):
        state = T - n + 1                          # its eps is new in this call (x_T's: from bind)
        fx = f(x, frozen_from=state + 1, fresh_from=state)
        abs_res, rel_res, row_rel = residuals(fx, x, reducer)
        stats.iterations = n
        stats.abs_trace.append(abs_res)
        stats.rel_trace.append(rel_res)
        if not all(flag[0] for flag in reducer.gather(torch.isfinite(fx).all().double()[None]).tolist()):
            raise SolverDivergedError(divergence_message("sequential", n))
        if callback is not None:
            callback(n, stats, fx)
        x = fx
    stats.converged = stats.exact_by_depth = True
    B = x0.shape[1]
    stats.finish(row_rel, torch.zeros(B, dtype=torch.float64, device=x0.device),
                 torch.full((B,), T, dtype=torch.long, device=x0.device))
    return x, stats


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, SolverStats]]] = {
    "sequential": sequential,
    "picard": picard,
    "anderson": anderson,
    "triangular-anderson": triangular_anderson,
    "newton-scan": newton_scan,        # quasi-Newton, the correction a parallel scan (newton_scan.py)
}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, SolverStats]]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


# Arguments that callers pass, not settings a user chooses in a config.
CALLER_ARGUMENTS = ("f", "x0", "reducer", "callback", "triangular")


def option_defaults(name: str) -> dict[str, object]:
    """The user-settable options of solver `name` and their defaults, read from its signature:
    the one place where solver options are defined (configs list the union over solvers)."""
    signature = inspect.signature(get_solver(name))
    return {k: p.default for k, p in signature.parameters.items() if k not in CALLER_ARGUMENTS}


def solvers_taking(option: str) -> list[str]:
    """The registered solvers that take `option` (e.g. 'jacobian' -> ['newton-scan']), in order."""
    return [name for name in SOLVERS if option in option_defaults(name)]


def options_from(name: str, section: dict) -> dict[str, object]:
    """The options of solver `name` found in a config section; the other solvers' keys are
    left out (a config lists m, lam, beta for Anderson; picard takes none of them)."""
    return {k: section[k] for k in option_defaults(name) if section.get(k) is not None}


def solve(name: str, f: Map, x0: torch.Tensor, **options) -> tuple[torch.Tensor, SolverStats]:
    """Run solver `name`; an option that the solver does not take raises TypeError naming it."""
    solver = get_solver(name)
    accepted = set(inspect.signature(solver).parameters) - {"f", "x0"}
    unknown = set(options) - accepted
    if unknown:
        raise TypeError(f"solver {name!r} takes no option(s) {sorted(unknown)}; "
                        f"it accepts {sorted(accepted)}")
    return solver(f, x0, **options)
