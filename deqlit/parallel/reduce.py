"""Reductions that the fixed-point map and the solvers take over the timestep axis.

Every norm, inner product and cross-timestep sum goes through a Reducer, so that the timestep axis
can be split across processes later: the default `LocalReducer` sees all timesteps, a distributed
one sums over processes and passes carries between neighbouring shards.
"""
from __future__ import annotations

import torch


class LocalReducer:
    """All timesteps live in this process: reductions are plain local sums."""

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of per-shard partial sums (here: the value itself)."""
        return value

    def carry_from_later(self, local_total: torch.Tensor) -> torch.Tensor:
        """Sum of `local_total` over the shards that hold later timesteps (here: none, so zero)."""
        return torch.zeros_like(local_total)


LOCAL = LocalReducer()
