"""Config -> (noise network, abar): builds the network named in a config and loads its weights."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from deqlit.diffusion.schedule import alphas_cumprod, make_betas
from deqlit.models.loading import CheckpointNotFoundError, load_weights
from deqlit.models.unet import DDIMUNet

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path as given, or relative to the installed package (shipped assets)."""
    path = Path(path).expanduser()
    if path.exists() or path.is_absolute():
        return path
    for base in (PACKAGE_DIR.parent, PACKAGE_DIR):
        candidate = base / path
        if candidate.exists():
            return candidate
    return path


def schedule_from_config(diffusion: dict) -> torch.Tensor:
    """abar (N,) float64 from a config's `diffusion` section."""
    betas = make_betas(diffusion.get("beta_schedule", "linear"),
                       diffusion.get("num_diffusion_timesteps", 1000),
                       diffusion.get("beta_start", 1e-4), diffusion.get("beta_end", 0.02))
    return alphas_cumprod(betas)


def build_noise_model(cfg: dict, ckpt: Optional[str] = None, ema: Optional[bool] = None
                      ) -> tuple[nn.Module, torch.Tensor, Path]:
    """The config's network with its weights loaded, in eval mode; (model, abar, checkpoint path).

    `model.format: diffusers` loads a local diffusers UNet2DModel folder (checkpoint.path) and
    takes its schedule from the folder's scheduler config.
    """
    ckpt_cfg = cfg.get("checkpoint", {})
    path_text = ckpt or ckpt_cfg.get("path")
    if not path_text:
        raise CheckpointNotFoundError(
            "no checkpoint given: pass --ckpt PATH or set checkpoint.path in the config")
    path = resolve_checkpoint(path_text)
    if not path.exists() and ckpt_cfg.get("source"):
        # The config says where its checkpoint comes from (a paper download, or a train.py run).
        raise CheckpointNotFoundError(f"checkpoint not found: {path}. {ckpt_cfg['source']}")
    use_ema = ckpt_cfg.get("ema", True) if ema is None else ema
    if cfg.get("model", {}).get("format") == "diffusers":
        from deqlit.models.diffusers_adapter import load_diffusers_unet
        model, schedule = load_diffusers_unet(path)
        return model.eval(), schedule_from_config(schedule), path
    model_args = {k: v for k, v in cfg["model"].items() if k != "format"}
    model = DDIMUNet(**model_args)
    load_weights(model, path, ema=use_ema)
    return model.eval(), schedule_from_config(cfg.get("diffusion", {})), path
