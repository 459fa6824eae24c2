"""How T timestep rows split into K contiguous blocks, one per time shard (one process: one block
of all T rows), joining the blocks again, and the objective that a block backpropagates.

Block k holds the global rows [start_k, stop_k) of X = (x_0, ..., x_{T-1}); block K - 1 holds the
rows next to x_T. T need not be divisible by K: the first T mod K blocks get one row more (block 0
evaluates no network call for x_0 and the last block's x_T is evaluated once per solve, so the
extra rows go low).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """Global rows [start, stop) of a T-row chain."""
    start: int
    stop: int
    T: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def is_first(self) -> bool:
        """Holds x_0, the clean image."""
        return self.start == 0

    @property
    def is_last(self) -> bool:
        """Holds x_{T-1}, next to x_T: owns x_T's eps term."""
        return self.stop == self.T


def time_blocks(T: int, shards: int) -> list[Block]:
    """The K = `shards` contiguous blocks of T rows, in timestep order."""
    if shards < 1:
        raise ValueError(f"the number of time shards must be >= 1, got {shards}")
    if T < shards:
        raise ValueError(f"cannot split T = {T} timesteps over {shards} time shards (each needs at "
                         f"least one row): use at most {T} time shards or a longer chain")
    base, extra = divmod(T, shards)
    blocks, start = [], 0
    for k in range(shards):
        stop = start + base + (1 if k < extra else 0)
        blocks.append(Block(start, stop, T))
        start = stop
    return blocks


def block_of(T: int, shards: int, shard_index: int) -> Block:
    """Block `shard_index` of `time_blocks(T, shards)`."""
    if not 0 <= shard_index < shards:
        raise ValueError(f"shard index {shard_index} is outside 0..{shards - 1}")
    return time_blocks(T, shards)[shard_index]


def all_rows(local, T: int, reducer):
    """Every block's rows (rows_k, ...) joined in shard order into the whole chain's (T, ...), on
    every shard: one gather of the blocks padded to the longest (the block itself in one process).
    No gradient. reducer: a deq.reduce.LocalReducer or a DistributedReducer."""
    if reducer.shards == 1:
        return local
    blocks = time_blocks(T, reducer.shards)
    longest = max(b.rows for b in blocks)
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = reducer.gather(padded)                                      # (K, longest, ...)
    return torch.cat([parts[k, :blocks[k].rows] for k in range(reducer.shards)])


def x0_objective(X, block: Block, loss_of_x0):
    """What a block calls backward on: loss_of_x0(x_0) (a scalar; shard-independent terms go inside
    it, so they are counted once) on the block that holds x_0, 0 * sum(X) on the others, which
    still runs their half of the collectives in the graph. X (block rows, B, ...)."""
    if block.is_first:
        return loss_of_x0(X[0])
    return 0.0 * X.sum()
