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

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every shard's `value` stacked in shard order, (K, ...) (here: (1, ...)). No gradient."""
        return value[None]

    def broadcast_from(self, value: torch.Tensor, shard: int) -> torch.Tensor:
        """Shard `shard`'s `value` on every shard (here: the value itself). No gradient."""
        return value


LOCAL = LocalReducer()
