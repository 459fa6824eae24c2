"""Use a diffusers `UNet2DModel` saved on disk as a deqlit noise network (optional dependency).

`load_diffusers_unet(path)` reads a folder written by `UNet2DModel.save_pretrained`, or a pipeline
folder with `unet/` and `scheduler/` (the layout of google/ddpm-cifar10-32), and returns
(noise_model, schedule). noise_model behaves like DDIMUNet: eps = noise_model(x, t) with x (B, C, H, W)
and t (B,) integer timesteps. schedule holds the `diffusion:` keys of deqlit's configs.
Only local files are read: diffusers is called with local_files_only=True, nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deqlit.models.loading import CheckpointFormatError, CheckpointNotFoundError

# DDPM's schedule (Ho et al. 2020), used when the folder has no scheduler config.
DDPM_SCHEDULE: dict[str, Any] = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                     num_diffusion_timesteps=1000)

# diffusers' beta_schedule names -> deqlit's. squaredcos_cap_v2 is Nichol & Dhariwal's cosine
# (offset 0.008, betas capped at 0.999), the same as deqlit.diffusion.schedule.cosine_betas.
_BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}


class UnsupportedScheduleError(ValueError):
    """The scheduler config describes a diffusion that deqlit's DDIM sampler cannot run."""


def _import_unet2d() -> type:
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError("loading diffusers models needs the diffusers package: "
                          "pip install 'deqlit[diffusers]' (or pip install diffusers)") from err
    return UNet2DModel


class DiffusersNoiseModel(nn.Module):
    """Wraps a diffusers UNet2DModel as eps = model(x, t), with DDIMUNet's attributes.

    Attributes: resolution (image side), in_channels, config (the diffusers config as a dict).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        cfg = dict(unet.config)
        size = cfg.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise CheckpointFormatError(f"the UNet is for {size} images; deqlit samples square "
                                            "images only")
            size = size[0]
        self.resolution: int = int(size) if size is not None else 0
        self.in_channels: int = int(cfg["in_channels"])
        self.out_channels: int = int(cfg["out_channels"])
        self.config = cfg

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) integer timesteps -> eps (B, C, H, W)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.unet(x, t).sample
        # Learned-variance models output [eps, variance] along channels (diffusers splits them the
        # same way in DDPMScheduler.step); DDIM uses eps only.
        return out[:, : self.in_channels] if self.out_channels == 2 * self.in_channels else out


def _find_folders(path: Path) -> tuple[Path, Path | None]:
    """(folder with the UNet's config.json, scheduler_config.json or None)."""
    if not path.exists():
        raise CheckpointNotFoundError(
            f"diffusers model folder not found: {path}. deqlit never downloads weights: fetch the "
            "model yourself (e.g. `huggingface-cli download google/ddpm-cifar10-32 --local-dir "
            "ddpm-cifar10-32`) and pass the local folder")
    if not path.is_dir():
        raise CheckpointFormatError(f"{path} is a file; load_diffusers_unet takes the folder written "
                                    "by save_pretrained (use deqlit.models.loading.load_weights for "
                                    "checkpoint files)")
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise CheckpointFormatError(f"{path} has neither config.json nor unet/config.json: it is not "
                                    "a folder written by UNet2DModel.save_pretrained or a pipeline")
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            return unet_dir, candidate
    return unet_dir, None


def schedule_from_scheduler_config(config: dict[str, Any], source: str = "scheduler config"
                                   ) -> dict[str, Any]:
    """Map a diffusers scheduler config onto deqlit's `diffusion:` keys.

    Returns {beta_schedule: 'linear' | 'cosine', beta_start, beta_end, num_diffusion_timesteps}.
    Missing fields take diffusers' defaults (which are DDPM's).
    """
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UnsupportedScheduleError(
            f"{source}: prediction_type is {prediction!r}, but deqlit's DDIM fixed point needs a "
            "network that predicts the noise (prediction_type 'epsilon'); use an epsilon model")
    if config.get("trained_betas") is not None:
        raise UnsupportedScheduleError(f"{source}: explicit trained_betas are not supported; "
                                       "use a 'linear' or 'squaredcos_cap_v2' schedule")
    name = config.get("beta_schedule", "linear")
    if name not in _BETA_SCHEDULES:
        raise UnsupportedScheduleError(
            f"{source}: beta_schedule {name!r} is not supported; deqlit runs "
            f"{' and '.join(map(repr, _BETA_SCHEDULES))} (mapped to 'linear' / 'cosine')")
    return dict(beta_schedule=_BETA_SCHEDULES[name],
                beta_start=float(config.get("beta_start", DDPM_SCHEDULE["beta_start"])),
                beta_end=float(config.get("beta_end", DDPM_SCHEDULE["beta_end"])),
                num_diffusion_timesteps=int(config.get("num_train_timesteps",
                                                       DDPM_SCHEDULE["num_diffusion_timesteps"])))


def load_diffusers_unet(path: str | Path) -> tuple[DiffusersNoiseModel, dict[str, Any]]:
    """Load a local diffusers UNet2DModel (or pipeline folder) as (noise_model, schedule).

    noise_model: eps = noise_model(x (B, C, H, W), t (B,)), in eval mode on the CPU.
    schedule: {beta_schedule, beta_start, beta_end, num_diffusion_timesteps}, DDPM's linear
    1e-4..0.02 over 1000 steps when the folder has no scheduler_config.json.
    """
    path = Path(path)
    unet_dir, scheduler_file = _find_folders(path)
    if scheduler_file is None:
        schedule = dict(DDPM_SCHEDULE)
    else:
        schedule = schedule_from_scheduler_config(json.loads(scheduler_file.read_text()),
                                                  str(scheduler_file))
    unet_cls = _import_unet2d()
    unet_config = json.loads((unet_dir / "config.json").read_text())
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointFormatError(f"{unet_dir} holds a {unet_config['_class_name']}; only "
                                    "unconditional UNet2DModel networks are supported")
    if unet_config.get("time_embedding_type", "positional") == "fourier":
        raise CheckpointFormatError(f"{unet_dir} is a continuous-time (fourier embedding, score "
                                    "SDE) model; deqlit needs a discrete-timestep DDPM model")
    if unet_config.get("class_embed_type") is not None or unet_config.get("num_class_embeds"):
        raise CheckpointFormatError(f"{unet_dir} is class-conditional; deqlit samples "
                                    "unconditional models only")
    unet = unet_cls.from_pretrained(str(unet_dir), local_files_only=True)
    return DiffusersNoiseModel(unet).eval(), schedule
