"""Losses and gradients of training through a time-sharded DEQ (joint fine-tuning, inversion).

The rule (mesh.py): differentiate the SUM over the time shards of per-shard objectives, and the
MEAN over the data replicas. So a term that every time shard could compute (the reconstruction of
x_0, a prior or typicality loss, anything of the latents or weights alone) is counted on one shard
only, shard 0, which holds x_0; every other shard still calls backward (the carry's backward is a
collective) on 0 * sum(X): deq.blocks.x0_objective. Gradients of what every process holds a copy of (weights, a latents
table) are then all_reduced over the world and divided by the number of data replicas: what the
ddp_time strategy's DDP hook does, here for code that runs without DDP.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from deqlit.parallel.mesh import TimeMesh


def sum_time_mean_data(params: Iterable[torch.Tensor], mesh: TimeMesh) -> None:
    """.grad of every replicated tensor: summed over the world, divided by the data replicas
    (sum over the time group, mean over the data group), in place. A collective: every process
    calls it with the same tensors in the same order; a missing .grad counts as zero."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(mesh.data)
