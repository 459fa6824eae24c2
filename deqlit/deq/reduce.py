"""Reductions that the fixed-point map and the solvers take over the timestep axis.

Every norm, inner product and cross-timestep sum goes through a Reducer, so that the timestep axis
can be split across processes: the default `LocalReducer` sees all timesteps, the
`DistributedReducer` (distributed.py) sums over the processes of a time group and passes carries
between the shards. Shard k of K holds a contiguous block of rows; shard K - 1 holds the rows next
to x_T ("later" shards hold later, i.e. noisier, states).
"""
from __future__ import annotations

import torch


class LocalReducer:
    """All timesteps live in this process: reductions are plain local sums."""

    shard_index = 0     # this shard's position in timestep order
    shards = 1          # K, the number of time shards

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of per-shard partial sums (here: the value itself)."""
        return value

    def carry_from_later(self, local_total: torch.Tensor) -> torch.Tensor:
        """Sum of `local_total` over the shards that hold later timesteps (here: none, so zero)."""
        return torch.zeros_like(local_total)

    def carry_from_earlier(self, local_total: torch.Tensor) -> torch.Tensor:
        """Sum of `local_total` over the shards that hold earlier timesteps (here: none, so zero)."""
        return torch.zeros_like(local_total)

    def compose_from_later(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map U -> a U + b per image of the later shards composed, the last shard's
        applied first, from every shard's block map (a (B,), b (B, ...)); here: none, the identity."""
        return torch.ones_like(a), torch.zeros_like(b)

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every shard's `value` stacked in shard order, (K, ...) (here: (1, ...)). No gradient."""
        return value[None]

    def broadcast_from(self, value: torch.Tensor, shard: int) -> torch.Tensor:
        """Shard `shard`'s `value` on every shard (here: the value itself). No gradient."""
        return value

    def sum_gradients(self, params) -> None:
        """Sum .grad of replicated leaves over the shards (here: one shard, nothing to do)."""


LOCAL = LocalReducer()


class ReversedReducer:
    """`inner` with the shard order reversed: for a system solved on its rows flipped (the adjoint
    of the chain, whose rows depend on earlier rows), shard k becomes shard K - 1 - k, so "later"
    shards are the inner reducer's earlier ones. Same protocol as LocalReducer."""

    def __init__(self, inner):
        self.inner = inner
        self.shards = inner.shards
        self.shard_index = inner.shards - 1 - inner.shard_index

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.inner.sum(value)

    def carry_from_later(self, local_total: torch.Tensor) -> torch.Tensor:
        return self.inner.carry_from_earlier(local_total)

    def carry_from_earlier(self, local_total: torch.Tensor) -> torch.Tensor:
        return self.inner.carry_from_later(local_total)

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.inner.gather(value).flip(0)

    def broadcast_from(self, value: torch.Tensor, shard: int) -> torch.Tensor:
        return self.inner.broadcast_from(value, self.shards - 1 - shard)


def reversed_reducer(reducer) -> "LocalReducer | ReversedReducer":
    """The reducer for a solve on flipped rows (one process: the reducer itself)."""
    return reducer if reducer.shards == 1 else ReversedReducer(reducer)
