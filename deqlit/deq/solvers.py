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

from deqlit.parallel.reduce import LOCAL, LocalReducer

Map = Callable[..., torch.Tensor]


class SolverDivergedError(FloatingPointError):
    """The iteration produced NaN or Inf."""


@dataclass
class SolverStats:
    iterations: int = 0                      # calls of f
    converged: bool = False
    abs_residual: list[float] = field(default_factory=list)   # ||f(X) - X|| per call
    rel_residual: list[float] = field(default_factory=list)   # ||f(X) - X|| / (1e-5 + ||f(X)||)
    row_residual: list[float] = field(default_factory=list)   # per timestep row, last call
    network_rows: int = 0                    # eps evaluations per image (filled by the caller)

    @property
    def final_residual(self) -> float:
        return self.rel_residual[-1] if self.rel_residual else math.inf


def residuals(fx: torch.Tensor, x: torch.Tensor, reducer: LocalReducer) -> tuple[float, float, torch.Tensor]:
    """Reference definition: ||f(X) - X|| / (1e-5 + ||f(X)||) over all rows and images.

    Returns (absolute, relative, per-row relative (T,)).
    """
    diff_sq = (fx - x).double().pow(2).flatten(2).sum(-1).sum(-1)   # (T,)
    fx_sq = fx.double().pow(2).flatten(2).sum(-1).sum(-1)            # (T,)
    total_diff = reducer.sum(diff_sq.sum()).sqrt()
    total_fx = reducer.sum(fx_sq.sum()).sqrt()
    row_rel = diff_sq.sqrt() / (1e-5 + fx_sq.sqrt())
    return float(total_diff), float(total_diff / (1e-5 + total_fx)), row_rel


def check_finite(fx: torch.Tensor, iteration: int, solver: str) -> None:
    if not torch.isfinite(fx).all():
        raise SolverDivergedError(
            f"{solver}: the fixed-point iterate became NaN/Inf at iteration {iteration}. "
            f"Try a smaller beta (damping, e.g. 0.5), a larger lam (regularization, e.g. 1e-2), "
            f"or solver='picard', which cannot diverge faster than the sequential chain; "
            f"also check that the model's outputs are finite in float32")


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
         freeze: bool, reducer: LocalReducer,
         callback: Optional[Callable[[int, SolverStats, torch.Tensor], None]]) -> tuple[torch.Tensor, SolverStats]:
    """The loop shared by all solvers. `mix(xs, fxs, gs) -> X_next` or None for plain iteration."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    T = x0.shape[0]
    stats = SolverStats()
    x = x0
    xs: list[torch.Tensor] = []
    fxs: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    frozen_from: Optional[int] = None
    fx = x0
    for n in range(1, max_iter + 1):
        fx = f(x, frozen_from) if freeze else f(x)
        check_finite(fx, n, name)
        abs_res, rel_res, row_rel = residuals(fx, x, reducer)
        stats.iterations = n
        stats.abs_residual.append(abs_res)
        stats.rel_residual.append(rel_res)
        stats.row_residual = row_rel.tolist()
        if callback is not None:
            callback(n, stats, fx)
        # After n calls the rows >= T - n of f(X) are exact, so at n = T all of them are.
        if rel_res < tol or n >= T:
            stats.converged = True
            break
        settled = T - n          # rows >= settled are exact in fx
        if freeze:
            # The network inputs of rows >= settled no longer change: reuse their eps. Rows whose
            # own residual is below tol and all of whose later rows are too are frozen as well.
            below = int((row_rel < tol).flip(0).int().cumprod(0).sum())
            frozen_from = min(settled + 1, T - below)
        if mix is None:
            x = fx
            continue
        xs.append(x)
        fxs.append(fx)
        gs.append(fx - x)
        if len(xs) > m:
            xs.pop(0), fxs.pop(0), gs.pop(0)
        x_next = mix(xs, fxs, gs)
        x_next[settled:] = fx[settled:]
        x = x_next
    return fx, stats


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


def picard(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3, freeze: bool = False,
           reducer: LocalReducer = LOCAL, callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Plain fixed-point iteration X <- f(X); exact after T calls on a triangular system."""
    return _run("picard", f, x0, max_iter=max_iter, tol=tol, mix=None, m=0, freeze=freeze,
                reducer=reducer, callback=callback)


def anderson(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3, m: int = 5,
             lam: float = 1e-3, beta: float = 1.0, relative_lam: bool = True, freeze: bool = False,
             reducer: LocalReducer = LOCAL, callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration with weights solved per (timestep, image) row, as the reference does."""
    def mix(xs, fxs, gs):
        return _mix_with(mixing_weights(per_row_gram(gs), lam, relative_lam), xs, fxs, beta)
    return _run("anderson", f, x0, max_iter=max_iter, tol=tol, mix=mix, m=m, freeze=freeze,
                reducer=reducer, callback=callback)


def triangular_anderson(f: Map, x0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3,
                        m: int = 5, lam: float = 1e-3, beta: float = 1.0, relative_lam: bool = True,
                        freeze: bool = False, reducer: LocalReducer = LOCAL,
                        callback=None) -> tuple[torch.Tensor, SolverStats]:
    """Triangular Anderson (ParaTAA, Tang et al. 2024): row t's least-squares problem sums the Gram
    matrices of all rows j >= t, i.e. of itself and every state that it depends on."""
    def mix(xs, fxs, gs):
        gram = per_row_gram(gs)                                           # (T, B, n, n)
        carry = reducer.carry_from_later(gram.sum(0, keepdim=True))       # later shards
        cumulative = gram.flip(0).cumsum(0).flip(0) + carry
        return _mix_with(mixing_weights(cumulative, lam, relative_lam), xs, fxs, beta)
    return _run("triangular-anderson", f, x0, max_iter=max_iter, tol=tol, mix=mix, m=m,
                freeze=freeze, reducer=reducer, callback=callback)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, SolverStats]]] = {
    "picard": picard,
    "anderson": anderson,
    "triangular-anderson": triangular_anderson,
}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, SolverStats]]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solve(name: str, f: Map, x0: torch.Tensor, **options) -> tuple[torch.Tensor, SolverStats]:
    """Run solver `name`; an option that the solver does not take raises TypeError naming it."""
    solver = get_solver(name)
    accepted = set(inspect.signature(solver).parameters) - {"f", "x0"}
    unknown = set(options) - accepted
    if unknown:
        raise TypeError(f"solver {name!r} takes no option(s) {sorted(unknown)}; "
                        f"it accepts {sorted(accepted)}")
    return solver(f, x0, **options)
