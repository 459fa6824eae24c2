"""Exponential moving average of weights with warm-up, kept in torch's AveragedModel (its keys
'module.*' and 'n_averaged' are what checkpoints hold), updated by `update_ema` only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmup_ema_decay(num_averaged: int, max_decay: float) -> float:
    """decay = min(max_decay, (1 + n) / (10 + n)).

    Without warm-up, a 0.999 EMA still holds ~10% of the random init after 2,300 steps, which is
    enough to spoil samples of a briefly trained model (measured: shared/paper.md, last section).
    """
    return min(max_decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def make_ema(model: nn.Module) -> AveragedModel:
    """The EMA copy of `model`, frozen; step it with `update_ema` (AveragedModel.update_parameters
    would average without the warm-up decay, with host reads of n_averaged)."""
    ema = AveragedModel(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module, max_decay: float) -> None:
    """One EMA step of `ema` towards `model`, on the device without host reads.

    The warm-up decay of `warmup_ema_decay`, computed from the n_averaged tensor: the first update
    (n = 0) copies (lerp weight 1, which torch computes as exactly `end`), later ones lerp by
    1 - decay(n); buffers are copied. AveragedModel.update_parameters reads n_averaged on the host
    twice per call (`bool(n == 0)`, `if n > 0`): two GPU syncs per step.
    """
    averaged = [p.detach() for p in ema.module.parameters()]
    current = [p.detach() for p in model.parameters()]
    n = ema.n_averaged.to(torch.float64)
    decay = torch.clamp((1.0 + n) / (10.0 + n), max=max_decay)
    weight = torch.where(n == 0, torch.ones_like(decay), 1.0 - decay).to(averaged[0].dtype)
    # One weight view per tensor: the overload taking a 0-dim tensor weight reads it with
    # .item() (caught by the 'meta' test), a host sync.
    torch._foreach_lerp_(averaged, current, [weight.expand_as(p) for p in averaged])
    for mine, theirs in zip(ema.module.buffers(), model.buffers()):
        mine.copy_(theirs)
    ema.n_averaged += 1
