"""The DEQ-DDIM layer: x_T (and injected noise) -> the chain states of a block, as an nn.Module.

One process holds the block of all T rows; under time sharding each process of a time group runs
the same call with the same x_T (and noise) and holds and evaluates only its block (blocks.py), so
per-process state memory and network rows are about T / K. Nothing here branches on that: the
map and the solver see the block and the reducer, and `first_state` gets x_0 from the block that
holds it.

Forward solves X* = h(X*; x_T) without gradient. With grad='onestep' (and autograd on) it then
applies one damped step with gradient (paper Eq. 18, "1-step gradient"):
    X = (1 - tau) X* + tau h(X*; x_T)
so gradients reach x_T (through x_T itself and eps(x_T)) and the network's parameters (through
the eps of every state) at the cost of one batched network call, whatever T is. grad='ift'
attaches the exact implicit gradient instead (grad.py: the adjoint fixed point, solved like the
forward one). Across time shards, differentiate the SUM of the per-process losses (every process
calls backward; one without a loss term backpropagates 0 * X.sum()), then sum the gradients of
x_T and of the weights over the group: the result equals one process's gradient of the whole chain.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from deqlit.deq.fixed_point import FixedPointMap
from deqlit.deq.grad import adjoint_settings, attach_gradient, check_grad_mode
from deqlit.deq.reduce import LOCAL, LocalReducer
from deqlit.deq.solvers import SolverStats, get_solver, solve
from deqlit.diffusion.chain import Chain


class DEQSampler(nn.Module):
    """Solves the DDIM chain as one fixed point, on the block of rows of `reducer`'s shard.

    Args: model (eps network, forward(x, t)), chain (timesteps, alpha-bars, eta), solver name and
    its options, grad mode, tau, max_batch (rows per network call; None = all at once), adjoint
    (grad='ift': {'solver': name, ...}), reducer (LOCAL: one process holds all rows).
    Forward: x_T (B, C, H, W) (the same on every shard), noise (T, B, C, H, W) (or this block's term
    rows) when eta > 0, init (T or block rows, B, C, H, W) a warm start -> (X (block rows, B, C, H, W);
    X[0] = x_0 on the block that holds it, SolverStats with network_rows summed over blocks).
    """

    def __init__(self, model: nn.Module, chain: Chain, solver: str = "anderson",
                 solver_options: Optional[dict[str, Any]] = None, grad: str = "none", tau: float = 0.1,
                 max_batch: Optional[int] = None, adjoint: Optional[dict[str, Any]] = None,
                 reducer: LocalReducer = LOCAL):
        super().__init__()
        get_solver(solver)  # fail early on an unknown name
        check_grad_mode(grad, tau)
        self.model, self.chain, self.solver, self.reducer = model, chain, solver, reducer
        self.solver_options = dict(solver_options or {})
        self.grad, self.tau, self.max_batch = grad, tau, max_batch
        # grad='ift': the adjoint solver and its options ({'solver': name, ...}; default exact).
        self.adjoint = adjoint_settings(adjoint)
        self.block = self.make_map().block
        self.last_map: Optional[FixedPointMap] = None          # the last forward's map and
        self.last_solution: Optional[torch.Tensor] = None      # solver result X* (no graph)
        self.backward_stats: Optional[SolverStats] = None   # the last adjoint solve's (ift)

    @property
    def T(self) -> int:
        return self.chain.T

    def make_map(self) -> FixedPointMap:
        return FixedPointMap(self.model, self.chain, self.max_batch, self.reducer)

    def own_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This block's rows of a (T, ...) tensor; a (block rows, ...) tensor as it is."""
        if rows.shape[0] == self.chain.T:
            return rows[self.block.start:self.block.stop]
        if rows.shape[0] != self.block.rows:
            raise ValueError(f"expected {self.chain.T} rows or this block's {self.block.rows}, got {rows.shape[0]}")
        return rows

    def forward(self, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None,
                init: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SolverStats]:
        fmap = self.make_map()
        with torch.no_grad():
            fmap.bind(x_T.detach(), None if noise is None else noise.detach())
            # The reference starts every state at x_T; a warm start (e.g. the previous solve
            # during inversion) often needs far fewer iterations.
            if init is not None:
                start = self.own_rows(init.detach()).clone()
            else:
                start = x_T.detach()[None].expand(self.block.rows, *x_T.shape).clone()
            X, stats = solve(self.solver, fmap, start, reducer=self.reducer, **self.solver_options)
            rows = fmap.network_rows + (1 if self.block.is_last else 0)   # + eps(x_T)
            # On x_T's device: NCCL reduces GPU tensors only.
            stats.network_rows = int(self.reducer.sum(torch.tensor(float(rows), dtype=torch.float64,
                                                                   device=x_T.device)))
        self.last_map, self.last_solution = fmap, X
        X = attach_gradient(self.grad, fmap, X, x_T, noise, tau=self.tau, adjoint=self.adjoint,
                            on_backward=self._record_backward)
        return X, stats

    def first_state(self, X: torch.Tensor) -> torch.Tensor:
        """x_0 (B, C, H, W) on every shard, from the block that holds it. No gradient across shards
        (in one process: X[0] itself, with its graph)."""
        local = X[0] if self.block.is_first else torch.empty_like(X[0])
        return self.reducer.broadcast_from(local, 0)

    def _record_backward(self, stats: SolverStats) -> None:
        self.backward_stats = stats
