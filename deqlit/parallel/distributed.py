"""The Reducer of a time group: the timestep rows split over the processes of a torch.distributed group.

Shard k (the process of rank k in the group) holds a contiguous block of rows, later shards later
(noisier) states. Per call:
  sum(v)               one all_reduce of v                 (residual norms: O(B) numbers)
  carry_from_later(t)  one all_gather of the block totals  (O(K x image), never O(T x image))
  gather(v)            one all_gather of small flags        (no gradient)
`sum` and `carry_from_later` sit inside the 1-step gradient's graph, so both are autograd
Functions. Gradient convention: the quantity being differentiated is the SUM of the per-process
losses, and every process calls backward; so the gradient of an all_reduce is the all_reduce of
the gradients, and the gradient of an all_gather is the sum over processes of the gradient that
each process gives to the gathered slot of this one. Gradients of what every shard holds a copy of
(x_T, the network's weights) are partial on each shard: sum them over the group afterwards
(`sum_gradients`).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Iterable, Optional

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = value.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        value = value.contiguous()
        parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, value, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every process differentiates its own use of all K slots; slot k's total gradient is the
        # sum over processes, and belongs to process k.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def in_graph(value: torch.Tensor) -> torch.Tensor:
    """value, made part of the autograd graph whenever grad mode is on.

    A collective's backward is itself a collective: every process must run it. Under grad mode a
    shard's own input may carry no gradient (the first block's total with frozen weights) while
    another shard's does (the last block's, through eps(x_T)); a leaf that requires grad keeps the
    node, and with it the backward collective, on every process.
    """
    if torch.is_grad_enabled() and value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_(True)
    return value


class DistributedReducer:
    """Reductions over the processes of `group` (None: the default group), one shard each.

    The shard index is the process's rank in the group; shard K - 1 holds the rows next to x_T.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedReducer needs torch.distributed initialized: call "
                               "torch.distributed.init_process_group (or init_time_group) first")
        self.group = group
        self.shard_index = dist.get_rank(group)
        self.shards = dist.get_world_size(group)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over the shards, on every shard (differentiable)."""
        return _AllReduceSum.apply(in_graph(value), self.group)

    def all_totals(self, local_total: torch.Tensor) -> torch.Tensor:
        """Every shard's total stacked in shard order, (K, ...) (differentiable)."""
        return _AllGather.apply(in_graph(local_total), self.group)

    def carry_from_later(self, local_total: torch.Tensor) -> torch.Tensor:
        """Sum of the totals of the shards k' > k (zero on the last shard), same shape as the total."""
        totals = self.all_totals(local_total)
        return totals[self.shard_index + 1:].sum(0)

    def carry_from_earlier(self, local_total: torch.Tensor) -> torch.Tensor:
        """Sum of the totals of the shards k' < k (zero on the first shard), same shape as the total."""
        totals = self.all_totals(local_total)
        return totals[:self.shard_index].sum(0)

    def compose_from_later(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block maps U -> a U + b per image of the shards k' > k composed, the last shard's
        applied first (identity on the last shard): one all_gather of K maps. a (B,) or (B, ...)
        (one gain per component, broadcast over b's further axes), b (B, ...)."""
        batch = a.shape[0]
        flat = torch.cat([a.reshape(batch, -1).to(b.dtype), b.reshape(batch, -1)], dim=1)
        maps = self.all_totals(flat)                                              # (K, B, Da + Db)
        split = a[0].numel()
        A, Bv = torch.ones_like(a), torch.zeros_like(b)
        view = a.shape + (1,) * (b.dim() - a.dim())
        for k in range(self.shards - 1, self.shard_index, -1):   # (a_k, b_k) o (A, Bv)
            a_k, b_k = maps[k, :, :split].reshape(a.shape).to(a.dtype), maps[k, :, split:].reshape(b.shape)
            A, Bv = a_k * A, a_k.reshape(view).to(b.dtype) * Bv + b_k
        return A, Bv

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every shard's `value` stacked in shard order, (K, ...). No gradient (flags, sizes)."""
        value = value.detach().contiguous()
        parts = [torch.empty_like(value) for _ in range(self.shards)]
        dist.all_gather(parts, value, group=self.group)
        return torch.stack(parts)

    def broadcast_from(self, value: torch.Tensor, shard: int) -> torch.Tensor:
        """Shard `shard`'s `value` on every shard; `value` must have the same shape and dtype
        everywhere (its content on the other shards is ignored). No gradient."""
        out = value.detach().contiguous().clone()
        dist.broadcast(out, src=dist.get_global_rank(self.group, shard) if self.group is not None
                       else shard, group=self.group)
        return out

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Sum .grad of replicated leaves (x_T, weights) over the group, in place."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)


def init_time_group(backend: str = "gloo", timeout_s: float = 120.0, **kwargs) -> DistributedReducer:
    """init_process_group from the usual environment (torchrun: RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) with a timeout, and a reducer over the whole world as one time group.

    The timeout bounds how long a process waits in a collective for a peer that died or raised:
    it then stops with an error instead of hanging.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistributedReducer()
