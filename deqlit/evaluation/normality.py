"""Whether latents are typical white Gaussian noise, beyond the two moments of
diffusion/gaussianity.py: the tests that decide whether interpolating them works.

Interpolating inverted latents fails exactly when they are not typical noise (NoiseDiffusion 2024;
"There and Back Again", 2024, which tests each latent's normality with Shapiro-Wilk and looks at
the largest correlations inside 8x8 patches). Two statistics per latent z (C, H, W):
- Shapiro-Wilk: the p-value of the test that z's values are Gaussian (at most 5000 of them, taken
  evenly, where scipy's p-values are accurate); a set's rejection rate is the share of latents with
  p < alpha. White noise: about alpha.
- patch correlation: the largest |correlation| between pixels at a displacement (dy, dx), 0 <= dy,
  dx <= 2 (not both 0), counting only pairs inside the same 8x8 patch, on the standardized latent.
  White noise: a few 1 / sqrt(pairs); latents that still hold their image: ~0.5.
"""
from __future__ import annotations

import torch

PATCH = 8
MAX_SHIFT = 2
SHAPIRO_MAX = 5000


def shapiro_p_values(z: torch.Tensor) -> list[float]:
    """Shapiro-Wilk p-value of each latent's values: z (B, C, H, W) -> [B]."""
    from scipy.stats import shapiro
    flat = z.detach().double().flatten(1).cpu()
    step = max(1, -(-flat.shape[1] // SHAPIRO_MAX))
    return [float(shapiro(row[::step].numpy()).pvalue) for row in flat]


def rejection_rate(p_values: list[float], alpha: float = 0.05) -> float:
    """Share of latents whose normality is rejected at level alpha."""
    return sum(p < alpha for p in p_values) / max(1, len(p_values))


def patch_correlation(z: torch.Tensor, patch: int = PATCH, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """The largest |correlation| inside patch x patch blocks, per latent: z (B, C, H, W) -> (B,).

    z is standardized per latent; for each displacement the correlation is the mean of z_p z_q over
    the pairs (p, q = p + (dy, dx)) whose two pixels lie in the same block.
    """
    if z.dim() != 4:
        raise ValueError(f"expected latents (B, C, H, W), got shape {tuple(z.shape)}")
    s = z.detach().double()
    s = s - s.mean(dim=(1, 2, 3), keepdim=True)
    s = s / s.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    H, W = s.shape[-2:]
    rows = torch.arange(H, device=s.device) % patch
    cols = torch.arange(W, device=s.device) % patch
    best = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
    for dy in range(max_shift + 1):
        for dx in range(max_shift + 1):
            if dy == dx == 0 or dy >= H or dx >= W:
                continue
            # pairs (y, x) -> (y + dy, x + dx) inside one block: the row and column stay in it
            inside = ((rows[:H - dy] + dy) < patch)[:, None] & ((cols[:W - dx] + dx) < patch)[None, :]
            products = s[..., :H - dy, :W - dx] * s[..., dy:, dx:]
            count = inside.sum() * s.shape[1]
            r = (products * inside).sum(dim=(1, 2, 3)) / count
            best = torch.maximum(best, r.abs())
    return best


def normality(z: torch.Tensor, alpha: float = 0.05) -> dict[str, object]:
    """Per-latent Shapiro-Wilk p-values and patch correlations, and the set's rejection rate."""
    p = shapiro_p_values(z)
    return {"shapiro_p": p, "shapiro_rejection_rate": rejection_rate(p, alpha),
            "patch_correlation": patch_correlation(z).tolist()}
