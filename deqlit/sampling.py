"""One entry point for generating images with any solver (used by sample.py and the trainers)."""
from __future__ import annotations

from typing import Any

import torch

from deqlit.diffusion.schedule import timestep_sequence
from deqlit.diffusion.sequential import ddim_sample


def generate(model, x_T: torch.Tensor, abar: torch.Tensor, timesteps: int, skip: str = "uniform",
             eta: float = 0.0, solver: str = "sequential", noise: torch.Tensor | None = None,
             **solver_options: Any) -> tuple[torch.Tensor, dict]:
    """x_T (B, C, H, W) -> (x_0 (B, C, H, W), stats)."""
    seq = timestep_sequence(timesteps, len(abar), skip)
    if solver == "sequential":
        return ddim_sample(model, x_T, abar, seq, eta=eta, noise=noise), {"nfe": len(seq)}
    raise ValueError(f"unknown solver {solver!r}")
