"""What the gradient inversion (deq/inversion.py, BatchInverter) needs when the T chain rows of a
batch are split over the processes of a time group.

Every process of the group holds the same images, latents x_T and Adam state; each solves its block
of rows (sampler.py). The loss lives on the block of x_0 (shard 0): its per-image values are
broadcast so that every shard records the same history and takes the same early-stop decisions;
every shard calls backward (the carry's backward is a collective) and the gradients of x_T (and of
the noise, when optimized) are summed over the group, so the Adam step is the same everywhere and
equals one process's. The warm start and a saved batch state hold all T rows, so a state saved
with one number of time shards continues with another.
"""
from __future__ import annotations

from typing import Optional

import torch

from deqlit.deq.warm_start import shifted_warm_start
from deqlit.deq.blocks import Block, block_of
from deqlit.parallel.inverse_block import natural_rows_of_all_shards
from deqlit.deq.reduce import LocalReducer


def shard_block(T: int, reducer: LocalReducer) -> Block:
    return block_of(T, reducer.shards, reducer.shard_index)


def block_warm_start(warm: torch.Tensor, warm_x_T: torch.Tensor, x_T: torch.Tensor, abar: torch.Tensor,
                     data_var: torch.Tensor, block: Block) -> torch.Tensor:
    """shifted_warm_start on a block's rows (rows, B, ...): the flow ratios of its states x_start..
    x_{stop-1} relative to x_T (abar (T+1,) of x_0..x_T)."""
    rows_abar = torch.cat([abar[block.start:block.stop], abar[-1:]])
    return shifted_warm_start(warm, warm_x_T, x_T, rows_abar, data_var)


def loss_objective(X: torch.Tensor, targets: torch.Tensor, active: Optional[torch.Tensor], k: int,
                   early_stop_loss: float, block: Block, reducer: LocalReducer
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-image loss (B,) on every shard, no gradient; the active mask; what this shard calls
    backward on). X (rows, B, ...) is this shard's block of the onestep output.

    Shard 0 holds x_0 = X[0]: its objective is the summed loss of the active images. The others
    backpropagate 0 * sum(X), which runs their half of the collectives in the graph.
    """
    from deqlit.deq.inversion import frobenius_loss
    if block.is_first:
        per_image = frobenius_loss(X[0], targets)
        value = per_image.detach()
    else:
        per_image, value = None, torch.zeros(targets.shape[0], dtype=X.dtype, device=X.device)
    value = reducer.broadcast_from(value, 0)
    if k > 0:
        active = value >= early_stop_loss
    objective = (per_image * active).sum() if per_image is not None else 0.0 * X.sum()
    return value, active, objective


def gather_rows(local: torch.Tensor, T: int, reducer: LocalReducer) -> torch.Tensor:
    """A block of rows of X = (x_0, ..., x_{T-1}) on each shard -> all T rows on every shard."""
    # natural_rows_of_all_shards joins the blocks from shard K - 1 down; flip to shard order.
    return natural_rows_of_all_shards(local.flip(0), shard_block(T, reducer), reducer).flip(0)


def own_rows(rows: torch.Tensor, block: Block) -> torch.Tensor:
    """This block's rows of a (T, ...) tensor; a tensor of the block's rows as it is."""
    if rows.shape[0] == block.T:
        return rows[block.start:block.stop]
    if rows.shape[0] != block.rows:
        raise ValueError(f"a warm start holds {rows.shape[0]} rows: expected T = {block.T} or this "
                         f"block's {block.rows}")
    return rows
