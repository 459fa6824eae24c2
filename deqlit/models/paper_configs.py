"""The three UNet architectures of the DEQ-DDIM paper, as data.

They are the `model:` sections of DDIM's configs (cifar10.yml, celeba.yml, bedroom.yml). The paper's
checkpoints load strictly into `DDIMUNet(**PAPER_CONFIGS[name])`. `paper_layout` gives the state_dict
layout (key -> shape) of each, built on the meta device so that no memory is allocated; loading uses
it to name the config a mismatched file would fit.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    # Ho et al.'s CIFAR10 model (EMA checkpoint model-790000), 32x32.
    "cifar10": dict(ch=128, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16],
                    dropout=0.1, in_channels=3, resolution=32, resamp_with_conv=True),
    # DDIM's CelebA model (ckpt.pth), 64x64.
    "celeba": dict(ch=128, out_ch=3, ch_mult=[1, 2, 2, 2, 4], num_res_blocks=2,
                   attn_resolutions=[16], dropout=0.1, in_channels=3, resolution=64,
                   resamp_with_conv=True),
    # Ho et al.'s LSUN models (bedroom, church, cat), 256x256.
    "lsun": dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
                 attn_resolutions=[16], dropout=0.0, in_channels=3, resolution=256,
                 resamp_with_conv=True),
}

# Parameter counts, as a cheap cross-check of the layouts (tests compare them with the fixtures).
PAPER_PARAM_COUNTS: dict[str, int] = {"cifar10": 35_746_307, "celeba": 78_700_803,
                                      "lsun": 113_673_219}


@lru_cache(maxsize=None)
def paper_layout(name: str) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape of `DDIMUNet(**PAPER_CONFIGS[name])`, without allocating weights."""
    from deqlit.models.unet import DDIMUNet  # local import: unet does not depend on this module

    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown paper config {name!r}: use one of {sorted(PAPER_CONFIGS)}")
    with torch.device("meta"):
        model = DDIMUNet(**PAPER_CONFIGS[name])
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def match_paper_config(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Name of the paper config whose layout equals `shapes` (key -> shape) exactly, else None."""
    for name in PAPER_CONFIGS:
        if paper_layout(name) == shapes:
            return name
    return None
