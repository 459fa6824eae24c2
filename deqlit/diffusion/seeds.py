"""Per-image random streams: what an image draws (its Gaussian start x_T, its injected noise, a
random mask) comes from its own generator, seeded by (seed, image index), so a result does not
depend on the batch size, the other images of a batch or the number of processes (as in EDM's
per-seed generators).
"""
from __future__ import annotations

import torch


def per_image_generator(seed: int, index: int) -> torch.Generator:
    """Image `index`'s own CPU generator under run seed `seed`."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(index))


def gaussian_latent(seed: int, index: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """Image `index`'s Gaussian start x_T ~ N(0, I) of `shape`: the first draw of its generator."""
    return torch.randn(tuple(shape), generator=per_image_generator(seed, index), dtype=dtype)
