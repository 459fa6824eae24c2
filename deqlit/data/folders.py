"""Datasets read from the user's disk (filled in by the data issue)."""
from __future__ import annotations

import torch


def load_local_dataset(name: str, split: str, resolution: int, channels: int, root: str,
                       limit: int | None = None) -> torch.Tensor:
    raise ValueError(f"unknown dataset {name!r}")
