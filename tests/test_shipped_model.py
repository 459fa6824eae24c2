"""The noise network that ships with deqlit: it loads, and it denoises held-out faces far better
than the same network at its random init (bounds set from the figures in MODEL_CARD.md)."""
from __future__ import annotations

import torch

from deqlit.config import find_config, load_config
from deqlit.data.faces import load_faces
from deqlit.evaluation import denoising_loss
from deqlit.models.build import build_noise_model
from deqlit.models.unet import DDIMUNet

HELDOUT_MSE_BOUND = 0.2        # measured 0.105 (see MODEL_CARD.md); a random init gives 1.33


def test_shipped_checkpoint_loads_and_denoises_held_out_faces():
    cfg = load_config(find_config("faces"))
    model, abar, path = build_noise_model(cfg)
    assert path.is_file() and path.stat().st_size < 15 * 2 ** 20
    assert sum(p.numel() for p in model.parameters()) == 2_244_609
    held_out = load_faces("test")
    trained = denoising_loss(model, held_out, abar)
    torch.manual_seed(0)
    untrained = denoising_loss(DDIMUNet(**cfg["model"]).eval(), held_out, abar)
    assert trained < HELDOUT_MSE_BOUND < untrained
    assert trained < 0.15 * untrained
