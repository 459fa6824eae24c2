"""The DEQ-DDIM layer: x_T (and injected noise) -> all T chain states, as an nn.Module.

Forward solves X* = h(X*; x_T) without gradient. With grad='onestep' (and autograd on) it then
applies one damped step with gradient (paper Eq. 18, "1-step gradient"):
    X = (1 - tau) X* + tau h(X*; x_T)
so gradients reach x_T (through x_T itself and eps(x_T)) and the network's parameters (through
the eps of every state) at the cost of one batched network call, whatever T is. With the network
frozen (inversion) only eps(x_T) carries a gradient, so the step reuses the solver's eps and
evaluates one row per image with autograd (latent_only_step).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.diffusion.chain import Chain
from deqlit.deq.solvers import SolverStats, get_solver, solve

GRAD_MODES = ("none", "onestep")


class DEQSampler(nn.Module):
    """Solves the whole DDIM chain as one fixed point.

    Args: model (eps network, forward(x, t)), chain (timesteps, alpha-bars, eta), solver name and
    its options, grad mode, tau, max_batch (rows per network call; None = all at once).
    Forward: x_T (B, C, H, W), noise (T, B, C, H, W) when eta > 0, init (T, B, C, H, W) a warm start
    -> (X (T, B, C, H, W) with X[0] = x_0, SolverStats).
    """

    def __init__(self, model: nn.Module, chain: Chain, solver: str = "anderson", solver_options: Optional[dict[str, Any]] = None,
                 grad: str = "none", tau: float = 0.1, max_batch: Optional[int] = None):
        super().__init__()
        get_solver(solver)  # fail early on an unknown name
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; use one of {GRAD_MODES}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.model, self.chain, self.solver = model, chain, solver
        self.solver_options = dict(solver_options or {})
        self.grad, self.tau, self.max_batch = grad, tau, max_batch

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
        if self.grad == "onestep" and torch.is_grad_enabled():
            if any(p.requires_grad for p in self.model.parameters()):
                # Training the network: every state's eps carries a gradient to the weights.
                grad_map = self.make_map().bind(x_T, noise)
                X = (1 - self.tau) * X + self.tau * grad_map(X)
            else:
                X = (1 - self.tau) * X + self.tau * latent_only_step(fmap, x_T, noise)
        return X, stats


def latent_only_step(fmap: FixedPointMap, x_T: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """h(X*; x_T) with a graph to x_T (and noise) only, for a frozen network (inversion).

    With the weights frozen and X* detached, the eps of the states x_1..x_{T-1} carry no gradient,
    so the solver's last cached eps are reused and only eps(x_T) is evaluated with autograd: one
    network row per image instead of T. The value is f(X_last), which is what the solver returned.
    fmap: the map the solver used (bound, cache filled). x_T (B, C, H, W) -> (T, B, C, H, W).
    """
    grad_map = FixedPointMap(fmap.model, fmap.chain, fmap.max_batch, fmap.reducer)
    grad_map.bind(x_T, noise)
    return grad_map.states_from_eps(torch.cat([fmap.cached_eps(), grad_map.top_eps()[None]]))
