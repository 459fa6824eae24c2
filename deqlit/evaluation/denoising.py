"""Held-out denoising loss of a noise network: the training objective on fixed noise and timesteps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def denoising_loss(model: nn.Module, images: torch.Tensor, abar: torch.Tensor, seed: int = 1234,
                   timesteps: tuple[int, ...] = (50, 250, 500, 750, 950)) -> float:
    """Mean ||eps - eps_theta(x_t, t)||^2 per pixel on fixed noise at fixed timesteps.

    images (N, C, H, W) in [-1, 1]; abar (N_train,) the schedule's cumulative alphas.
    """
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for t_value in timesteps:
        noise = torch.randn(images.shape, generator=gen)
        a = float(abar[t_value])
        x_t = a ** 0.5 * images + (1 - a) ** 0.5 * noise
        t = torch.full((images.shape[0],), t_value, dtype=torch.long)
        losses.append(F.mse_loss(model(x_t, t), noise))
    return float(torch.stack(losses).mean())
