"""The DEQ-DDIM layer: x_T (and injected noise) -> all T chain states, as an nn.Module.

Forward solves X* = h(X*; x_T) without gradient. With grad='onestep' (and autograd on) it then
applies one damped step with gradient (paper Eq. 18, "1-step gradient"):
    X = (1 - tau) X* + tau h(X*; x_T)
so gradients reach x_T (through x_T itself and eps(x_T)) and the network's parameters (through
the eps of every state) at the cost of one batched network call, whatever T is. With the network
frozen (inversion) only eps(x_T) carries a gradient, so the step reuses the solver's eps and
evaluates one row per image with autograd (latent_only_step). grad='ift' attaches the exact
implicit gradient instead (grad.py: the adjoint fixed point, solved like the forward one).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.grad import (GRAD_MODES, adjoint_settings, attach_gradient,  # noqa: F401 (re-export)
                             check_grad_mode, latent_only_step)
from deqlit.diffusion.chain import Chain
from deqlit.deq.solvers import SolverStats, get_solver, solve


class DEQSampler(nn.Module):
    """Solves the whole DDIM chain as one fixed point.

    Args: model (eps network, forward(x, t)), chain (timesteps, alpha-bars, eta), solver name and
    its options, grad mode, tau, max_batch (rows per network call; None = all at once).
    Forward: x_T (B, C, H, W), noise (T, B, C, H, W) when eta > 0, init (T, B, C, H, W) a warm start
    -> (X (T, B, C, H, W) with X[0] = x_0, SolverStats).
    """

    def __init__(self, model: nn.Module, chain: Chain, solver: str = "anderson", solver_options: Optional[dict[str, Any]] = None,
                 grad: str = "none", tau: float = 0.1, max_batch: Optional[int] = None,
                 adjoint: Optional[dict[str, Any]] = None):
        super().__init__()
        get_solver(solver)  # fail early on an unknown name
        check_grad_mode(grad, tau)
        self.model, self.chain, self.solver = model, chain, solver
        self.solver_options = dict(solver_options or {})
        self.grad, self.tau, self.max_batch = grad, tau, max_batch
        # grad='ift': the adjoint solver and its options ({'solver': name, ...}; default exact).
        self.adjoint = adjoint_settings(adjoint)
        self.backward_stats: Optional[SolverStats] = None   # the last adjoint solve's (ift)

    @property
    def T(self) -> int:
        return self.chain.T

    def make_map(self) -> FixedPointMap:
        return FixedPointMap(self.model, self.chain, self.max_batch)

    def forward(self, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None,
                init: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SolverStats]:
        fmap = self.make_map()
        with torch.no_grad():
            fmap.bind(x_T.detach(), None if noise is None else noise.detach())
            # The reference starts every state at x_T; a warm start (e.g. the previous solve
            # during inversion) often needs far fewer iterations.
            start = init.detach() if init is not None else x_T.detach()[None].expand(self.T, *x_T.shape).clone()
            X, stats = solve(self.solver, fmap, start, **self.solver_options)
        stats.network_rows = fmap.network_rows + 1  # + eps(x_T)
        X = attach_gradient(self.grad, fmap, X, x_T, noise, tau=self.tau, adjoint=self.adjoint,
                            on_backward=self._record_backward)
        return X, stats

    def _record_backward(self, stats: SolverStats) -> None:
        self.backward_stats = stats
