"""How much a latent x_T looks like white Gaussian noise, per image.

Two statistics that a DDIM latent of real data should have and a latent that still carries the
image does not (exact latents of held-out faces measured lag-1 autocorrelation 0.45-0.49 and
kurtosis 3.9-8.5):
- lag-1 spatial autocorrelation: the correlation of each pixel with its right and lower neighbour,
  averaged over the two directions and the channels. White noise: 0 (+- about 1 / sqrt(C H W)).
- kurtosis (not excess): E[(z - mu)^4] / E[(z - mu)^2]^2 over all pixels of an image.
  Gaussian: 3; uniform: 1.8; Laplace: 6.
Pure functions of z (B, C, H, W) -> (B,): the reported statistics in float64; the pair of
directional autocorrelations and the chi2 of all of them in z's dtype, for training penalties.
"""
from __future__ import annotations

import torch


def _standardized(z: torch.Tensor) -> torch.Tensor:
    """Each image minus its mean, over its standard deviation; z's dtype (differentiable)."""
    if z.dim() != 4:
        raise ValueError(f"expected latents (B, C, H, W), got shape {tuple(z.shape)}")
    centered = z - z.mean(dim=(1, 2, 3), keepdim=True)
    # A constant image has no defined correlation: its zero variance gives NaN, not a made-up number.
    return centered / centered.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


def lag1_autocorrelations(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The horizontal and the vertical lag-1 autocorrelation of each image, ((B,), (B,)), in z's
    dtype and differentiable (joint fine-tuning's typicality penalty backpropagates through it).

    Each image is standardized by its own mean and variance over all pixels, then
    r = mean over neighbouring pairs of z_p z_q. Needs H, W >= 2.
    """
    if z.dim() == 4 and min(z.shape[-2:]) < 2:
        raise ValueError(f"lag-1 autocorrelation needs H, W >= 2, got {tuple(z.shape[-2:])}")
    s = _standardized(z)
    return (s[..., :, 1:] * s[..., :, :-1]).mean(dim=(1, 2, 3)), (s[..., 1:, :] * s[..., :-1, :]).mean(dim=(1, 2, 3))


def lag1_autocorrelation(z: torch.Tensor) -> torch.Tensor:
    """Mean of the horizontal and vertical lag-1 autocorrelations of each image, (B,) float64."""
    horizontal, vertical = lag1_autocorrelations(z.double())
    return (horizontal + vertical) / 2


def _kurtosis(z: torch.Tensor) -> torch.Tensor:
    return _standardized(z).pow(4).mean(dim=(1, 2, 3))


def kurtosis(z: torch.Tensor) -> torch.Tensor:
    """Kurtosis (Gaussian = 3) of each image's pixel values, (B,) float64."""
    return _kurtosis(z.double())


def typicality_chi2(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared z-scores of (horizontal and vertical lag-1 autocorrelation, kurtosis, mean)
    under white N(0, I) noise, (B,) in z's dtype, differentiable; about 4 for such noise (4 degrees
    of freedom), large for structured latents (exact latents of held-out faces: ~450).

    Standard deviations under N(0, I): 1 / sqrt(pairs) for an autocorrelation, sqrt(24 / D) for the
    kurtosis, 1 / sqrt(D) for the mean (D = C H W).
    """
    _, c, h, w = z.shape
    d = c * h * w
    horizontal, vertical = lag1_autocorrelations(z)
    return (c * h * (w - 1) * horizontal ** 2 + c * (h - 1) * w * vertical ** 2
            + d / 24.0 * (_kurtosis(z) - 3.0) ** 2 + d * z.mean(dim=(1, 2, 3)) ** 2)


def gaussianity(z: torch.Tensor) -> dict[str, list[float]]:
    """Both statistics per image as plain lists (for metrics.json and loggers)."""
    return {"lag1_autocorrelation": lag1_autocorrelation(z).tolist(), "kurtosis": kurtosis(z).tolist()}
