"""Where a command without a Trainer (sample.py, benchmarks) runs: the config's trainer section's
accelerator and precision, read the way Lightning reads them."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

DTYPES = {"64-true": torch.float64, "64": torch.float64, "32-true": torch.float32, "32": torch.float32,
          "16-true": torch.float16, "bf16-true": torch.bfloat16}
AUTOCAST = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def resolve_device(accelerator: str = "auto") -> torch.device:
    """'cpu' | 'gpu' | 'cuda' | 'auto' (a GPU when there is one) -> torch.device."""
    accelerator = str(accelerator).lower()
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--trainer.accelerator {accelerator}: no CUDA GPU is visible to PyTorch "
                             f"here; use --trainer.accelerator cpu (or auto)")
        return torch.device("cuda")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"unknown accelerator {accelerator!r}: use cpu, gpu or auto")


def placement(section: dict[str, Any] | None) -> tuple[torch.device, torch.dtype, ContextManager]:
    """(device, parameter dtype, autocast context) for a trainer section's accelerator/precision."""
    section = section or {}
    device = resolve_device(section.get("accelerator", "auto"))
    precision = str(section.get("precision", "32-true"))
    if precision in AUTOCAST:
        return device, torch.float32, torch.autocast(device.type, dtype=AUTOCAST[precision])
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}: use one of "
                         f"{', '.join(list(DTYPES) + list(AUTOCAST))}")
    return device, DTYPES[precision], contextlib.nullcontext()
