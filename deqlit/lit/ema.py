"""Exponential moving average of weights with warm-up, on top of torch's AveragedModel."""
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


def make_ema(model: nn.Module, max_decay: float) -> AveragedModel:
    """An AveragedModel (keys 'module.*', 'n_averaged') whose update is one fused step per device.

    The decay is computed from the `n_averaged` tensor on the device, once per update, so an
    update makes no host sync per parameter (an `int(n)` per tensor would, on a GPU).
    """
    def average(avg_params: list[torch.Tensor], params: list[torch.Tensor],
                num_averaged: torch.Tensor) -> None:
        n = num_averaged.to(torch.float64)
        decay = torch.clamp((1.0 + n) / (10.0 + n), max=max_decay)
        # avg <- decay * avg + (1 - decay) * param, as avg + (1 - decay) * (param - avg)
        weight = (1.0 - decay).to(avg_params[0].dtype)
        torch._foreach_lerp_(avg_params, params, weight)

    ema = AveragedModel(model, multi_avg_fn=average)
    ema.requires_grad_(False)
    return ema
