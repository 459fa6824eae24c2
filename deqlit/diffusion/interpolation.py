"""Paths between two latents x_T, decoded by the chain into a morph between their images.

White Gaussian noise in D dimensions lives near the sphere of radius sqrt(D): the straight line
between two latents cuts inside it (its midpoint has norm ~ sqrt(D / 2) for independent latents),
where the network never saw an input, so linear midpoints decode to washed-out images. Spherical
interpolation (Shoemake's slerp) walks the great circle instead:
    slerp(a, b; t) = sin((1 - t) w) / sin(w) a + sin(t w) / sin(w) b,   cos w = <a, b> / (|a| |b|)
and, for latents of different norms, scales the direction by the interpolated norm
(1 - t) |a| + t |b|. Both endpoints are reproduced exactly (t = 0, 1).
"""
from __future__ import annotations

import torch

METHODS = ("slerp", "lerp")
FRAMES_RULE = "must be 2 or more (the two endpoints are frames)"


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) a + t b for each t: a, b (C, H, W), t (F,) -> (F, C, H, W)."""
    t = t.to(a).reshape(-1, *([1] * a.dim()))
    return (1 - t) * a[None] + t * b[None]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the directions of a and b, with linearly interpolated norms:
    a, b (C, H, W), t (F,) -> (F, C, H, W). Nearly parallel latents fall back to lerp."""
    norm_a, norm_b = a.norm(), b.norm()
    unit_a, unit_b = a / norm_a, b / norm_b
    cos = (unit_a * unit_b).sum().clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    t = t.to(a).reshape(-1, *([1] * a.dim()))
    if float(omega.sin().abs()) < 1e-6:          # parallel: the great circle is the line
        return lerp(a, b, t.flatten())
    direction = (torch.sin((1 - t) * omega) * unit_a[None] + torch.sin(t * omega) * unit_b[None]) / omega.sin()
    return ((1 - t) * norm_a + t * norm_b) * direction


def interpolate(a: torch.Tensor, b: torch.Tensor, frames: int, method: str = "slerp") -> torch.Tensor:
    """`frames` latents from a to b (endpoints included), (frames, C, H, W)."""
    if method not in METHODS:
        raise ValueError(f"unknown interpolation {method!r}; use one of {', '.join(METHODS)}")
    if frames < 2:
        raise ValueError(f"--frames {FRAMES_RULE}, got {frames}")
    t = torch.linspace(0, 1, frames, dtype=torch.float64)
    path = slerp(a.double(), b.double(), t) if method == "slerp" else lerp(a.double(), b.double(), t)
    return path.to(a.dtype)


def parse_pairs(text: str, count: int) -> list[tuple[int, int]]:
    """'0:1,2:3' -> [(0, 1), (2, 3)], each index below `count` (the latents in the file); a pair
    joins two different rows, and each pair is listed once (its strip is one file)."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            i, j = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--pairs {text!r}: write pairs of latent rows as I:J, comma-separated, "
                             f"e.g. --pairs 0:1,2:3") from None
        for k in (i, j):
            if not 0 <= k < count:
                raise ValueError(f"--pairs {text!r}: row {k} is not in the file, which holds rows "
                                 f"0..{count - 1}")
        if i == j:
            other = f"e.g. {i}:{(i + 1) % count}" if count > 1 else "and the file holds one"
            raise ValueError(f"--pairs {text!r} joins row {i} with itself: a pair joins two different "
                             f"latents, {other}")
        if (i, j) in pairs:
            raise ValueError(f"--pairs {text!r} lists {i}:{j} twice: list each pair once")
        pairs.append((i, j))
    return pairs
