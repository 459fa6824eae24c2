"""Sample-quality figures that need no download: KID on fixed random conv features, and the
held-out denoising loss of a noise network.

The Inception weights that FID and KID normally use cannot be fetched here, so the feature extractor is a
small conv net with weights drawn from a fixed seed: a fixed, if weaker, embedding, good for
comparing models and samples against each other (not for comparing with published FID numbers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance


class RandomConvFeatures(nn.Module):
    """Images in [-1, 1] (N, C, H, W) -> (N, 4096) features from 3 fixed random conv layers."""

    def __init__(self, in_channels: int = 1, seed: int = 0, width: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        channels = in_channels
        for out in (width, width * 2, width * 4):
            conv = nn.Conv2d(channels, out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * channels)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
            channels = out
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torchmetrics (normalize=True) hands over uint8 images in [0, 255]
        h = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        # Keep a coarse 4x4 layout: with global pooling alone a flat grey image scores like a face.
        return F.adaptive_avg_pool2d(h, 4).flatten(1)          # (N, 4 * width * 16)


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 16, seed: int = 0) -> float:
    """Kernel Inception Distance (mean over subsets) on RandomConvFeatures. Images in [-1, 1]."""
    torch.manual_seed(seed)
    metric = KernelInceptionDistance(feature=RandomConvFeatures(real.shape[1]),
                                     subset_size=min(subset_size, len(real), len(fake)),
                                     subsets=50, normalize=True)
    metric.update(((real + 1) / 2).clamp(0, 1), real=True)
    metric.update(((fake + 1) / 2).clamp(0, 1), real=False)
    mean, _ = metric.compute()
    return float(mean)


@torch.no_grad()
def denoising_loss(model: nn.Module, images: torch.Tensor, abar: torch.Tensor, seed: int = 1234,
                   timesteps: tuple[int, ...] = (50, 250, 500, 750, 950)) -> float:
    """Mean ||eps - eps_theta(x_t, t)||^2 per pixel on fixed noise at fixed timesteps."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for t_value in timesteps:
        noise = torch.randn(images.shape, generator=gen)
        a = float(abar[t_value])
        x_t = a ** 0.5 * images + (1 - a) ** 0.5 * noise
        t = torch.full((images.shape[0],), t_value, dtype=torch.long)
        losses.append(F.mse_loss(model(x_t, t), noise))
    return float(torch.stack(losses).mean())
