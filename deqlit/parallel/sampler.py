"""The DEQ-DDIM layer on one time shard: x_T -> this shard's block of the T chain states.

Every process of a time group runs the same call with the same x_T (and noise); each holds and
evaluates only its block of rows (blocks.py), so per-process state memory and network rows are
about T/K. The solver runs unchanged (solvers.py) with the DistributedReducer: residuals are summed
over the group, stop / freeze / NaN flags gathered once per iteration. `first_state` broadcasts x_0
to every process at the end.

Gradients ('onestep', the paper's Eq. 18): every process returns (1 - tau) X* + tau h(X*; x_T) on
its rows; x_T's eps term reaches the other blocks through the differentiable carry. Differentiate
the SUM of the per-process losses (every process calls backward, a process without a loss term
backpropagates 0 * X.sum()), then sum the gradients of x_T and of the weights over the group
(DistributedReducer.sum_gradients): the result equals one process's gradient of the whole chain.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from deqlit.deq.solvers import SolverStats, get_solver, solve
from deqlit.diffusion.chain import Chain
from deqlit.parallel.block_map import BlockMap
from deqlit.deq.blocks import Block, block_of
from deqlit.deq.reduce import LocalReducer

SHARDED_GRAD_MODES = ("none", "onestep")


class ShardedDEQSampler(nn.Module):
    """Like DEQSampler, on the block of rows of `reducer.shard_index` among `reducer.shards`.

    Forward: x_T (B, C, H, W) (the same on every process), noise (T, B, C, H, W) or this block's
    rows when eta > 0, init (T or block rows, B, C, H, W) a warm start -> (X (block rows, B, C, H, W),
    SolverStats with the residual traces of the whole chain and network_rows summed over blocks;
    row_residual covers this block's rows only).
    """

    def __init__(self, model: nn.Module, chain: Chain, reducer: LocalReducer, solver: str = "anderson",
                 solver_options: Optional[dict[str, Any]] = None, grad: str = "none", tau: float = 0.1,
                 max_batch: Optional[int] = None):
        super().__init__()
        get_solver(solver)
        if grad not in SHARDED_GRAD_MODES:
            raise ValueError(f"grad mode {grad!r} is not available with time sharding; use one of "
                             f"{SHARDED_GRAD_MODES} (the exact 'ift' adjoint is not sharded yet)")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.model, self.chain, self.reducer, self.solver = model, chain, reducer, solver
        self.solver_options = dict(solver_options or {})
        self.grad, self.tau, self.max_batch = grad, tau, max_batch
        self.block: Block = block_of(chain.T, reducer.shards, reducer.shard_index)
        self.last_map: Optional[BlockMap] = None

    def make_map(self) -> BlockMap:
        return BlockMap(self.model, self.chain, self.block, self.max_batch, self.reducer)

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
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
            if init is not None:
                start = self.local_rows(init.detach()).clone()
            else:
                start = x_T.detach()[None].expand(self.block.rows, *x_T.shape).clone()
            X, stats = solve(self.solver, fmap, start, reducer=self.reducer, **self.solver_options)
            rows = fmap.network_rows + (1 if self.block.is_last else 0)   # + eps(x_T)
            # On x_T's device: NCCL reduces GPU tensors only.
            stats.network_rows = int(self.reducer.sum(torch.tensor(float(rows), dtype=torch.float64,
                                                                   device=x_T.device)))
        self.last_map = fmap
        if self.grad == "onestep" and torch.is_grad_enabled():
            X = block_onestep(fmap, X, x_T, noise, self.tau)
        return X, stats

    def first_state(self, X: torch.Tensor) -> torch.Tensor:
        """x_0 (B, C, H, W) on every process, from the block that holds it. No gradient."""
        local = X[0] if self.block.is_first else torch.empty_like(X[0])
        return self.reducer.broadcast_from(local.detach(), 0)


def block_onestep(fmap: BlockMap, X_star: torch.Tensor, x_T: torch.Tensor,
                  noise: Optional[torch.Tensor], tau: float) -> torch.Tensor:
    """(1 - tau) X* + tau h(X*; x_T) on the block, X* held fixed (rows, B, ...).

    Trainable weights: every state's eps carries a gradient. Frozen weights (inversion): only
    eps(x_T) does, so the solver's cached eps are reused and only the last block evaluates a
    network row with autograd; the carry passes its gradient to the other blocks.
    """
    X_star = X_star.detach()
    grad_map = BlockMap(fmap.model, fmap.chain, fmap.block, fmap.max_batch, fmap.reducer).bind(x_T, noise)
    if any(p.requires_grad for p in fmap.model.parameters()):
        h = grad_map(X_star)
    else:
        parts = [fmap.cached_eps()]
        if grad_map.top_eps() is not None:
            parts.append(grad_map.top_eps()[None])
        h = grad_map.states_from_eps(torch.cat(parts))
    return (1 - tau) * X_star + tau * h
