"""Exact inversion over all timesteps (deq/inverse_map.py, Eq. 3) on one block of rows per time shard.

The inverse map's unknown X holds x_T, x_{T-1}, ..., x_1 (row r = x_{T-r}), and row r depends on
the rows >= r (itself included): x_i = sqrt(abar_i) (y_0 - sum_{j <= i} tau_j) with
tau_j = c_j eps(x_j) + d_j xi_j. That is the forward map's structure with the sum made inclusive, so
blocks of X split over the shards exactly as in block_map.py: block k holds the rows [start, stop),
i.e. the states x_{T-start} .. x_{T-stop+1}, and needs the terms of all earlier states, which are the
rows of the later blocks: the reducer's `carry_from_later` of its block total (one all_gather of K
images per call). Each block evaluates the network on its own states only.

`sharded_all_timesteps` is what `exact_invert(..., reducer=...)` runs when the reducer has more than
one shard; its report covers the whole chain (per-state residuals gathered once, at the end).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from deqlit.deq.fixed_point import NoiseModel
from deqlit.deq.inversion_report import InversionReport
from deqlit.deq.solvers import solve
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.inverse import ddim_inversion_states
from deqlit.deq.blocks import Block, block_of, time_blocks
from deqlit.deq.reduce import LocalReducer


def natural_rows_of_all_shards(local: torch.Tensor, block: Block, reducer: LocalReducer) -> torch.Tensor:
    """Every shard's rows (natural order, (rows_k, ...)) joined into the whole chain's (T, ...)
    x_1..x_T on every shard: one gather, blocks padded to the longest."""
    longest = -(-block.T // reducer.shards)
    padded = torch.zeros((longest,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    parts = reducer.gather(padded)                                      # (K, longest, ...)
    # Shard K - 1 holds x_1.. (the earliest states): natural order runs over the shards backwards.
    blocks = time_blocks(block.T, reducer.shards)
    return torch.cat([parts[k, :blocks[k].rows] for k in reversed(range(reducer.shards))])


def sharded_all_timesteps(model: NoiseModel, x0: torch.Tensor, chain: Chain, solver: str,
                          options: dict, noise: Optional[torch.Tensor], max_batch: Optional[int],
                          init: Union[str, torch.Tensor], reducer: LocalReducer
                          ) -> tuple[torch.Tensor, torch.Tensor, InversionReport]:
    """Eq. 3 solved with the rows split over the reducer's shards (x0 and noise the same on all).

    Returns (x_T (B, C, H, W) on every shard, this shard's states in natural order (rows, B, ...),
    the report of the whole chain, the same on every shard). init as in exact_invert
    (inverse_map.start_states); a tensor may hold all T states x_1..x_T or this block's.
    """
    from deqlit.deq.inverse_map import InverseChainMap, chunked, start_states
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
    else:                                              # all T states, as one process; keep ours
        states, start_depth = start_states(model, x0, chain, noise, max_batch, init)
        start = states[natural]
    G = InverseChainMap(model, chain, x0, noise, max_batch, block=block, reducer=reducer)
    X, stats = solve(solver, G, start.flip(0).contiguous(), reducer=reducer, **options)
    stop = stats.image_iterations                                      # the same on every shard
    B = x0.shape[0]
    at_stop = torch.stack([G.row_trace[stop[b] - 1][:, b] for b in range(B)], dim=1)   # (rows, B)
    rows = natural_rows_of_all_shards(at_stop, block, reducer)                        # (T, B)
    evals = reducer.sum(torch.tensor([float(G.rows_after_call[stop[b] - 1]) for b in range(B)],
                                     dtype=torch.float64, device=x0.device))
    report = InversionReport(
        row_residual=rows.tolist(),
        image_residual=list(stats.image_residual),
        image_iterations=list(stop),
        network_evals=[start_depth + int(round(float(e))) for e in evals],
        depth=start_depth + stats.iterations, start_depth=start_depth)
    # Row 0 of X is x_T, on shard 0.
    x_T = reducer.broadcast_from(X[0] if block.is_first else torch.empty_like(X[0]), 0)
    return x_T, X.flip(0), report
