"""Where a command without a Trainer (sample.py, benchmarks) runs: the config's trainer section's
accelerator and precision, read the way Lightning reads them."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

DTYPES = {"64-true": torch.float64, "64": torch.float64, "32-true": torch.float32, "32": torch.float32,
          "16-true": torch.float16, "bf16-true": torch.bfloat16}
AUTOCAST = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
# float16 has no fast kernels on CPUs (the shipped faces UNet, 16 images, one thread: 0.21 s a call
# in 32-true, 0.17 in bf16-mixed, 11.2 in float16 autocast and 11.3 in 16-true). Lightning itself
# runs 16-mixed on a CPU as bf16-mixed (with a warning); placement() does the same, so sample.py
# computes as invert.py and train.py do. 16-true is honoured everywhere, and said.
CPU_AUTOCAST_SUBSTITUTE = {"16-mixed": "bf16-mixed"}
SLOW_ON_CPU = ("16-true", "16")


def precision_note(device_type: str, precision: Any) -> str | None:
    """A line for a float16 precision on a CPU (None otherwise): 16-mixed runs as bf16-mixed there
    (placement), 16-true is ~50x slower than 32-true; the user learns why."""
    precision = str(precision)
    if device_type != "cpu":
        return None
    if precision in CPU_AUTOCAST_SUBSTITUTE:
        return (f"note: --trainer.precision {precision} on a CPU runs as "
                f"{CPU_AUTOCAST_SUBSTITUTE[precision]}, as Lightning does (float16 autocast has no "
                f"CPU kernels: ~50x slower)")
    if precision in SLOW_ON_CPU:
        return (f"note: --trainer.precision {precision} on a CPU computes in float16, which CPUs run "
                f"without fast kernels: about 50x slower than 32-true here; bf16-mixed is the CPU's "
                f"fast half precision (or run on a GPU)")
    return None


# The relative rounding (unit roundoff) of each half precision's numbers. The noise network's output
# carries no more, and a solver's relative residual, made of such outputs, stalls near it: a tol
# below it is met only as the triangular chain's rows become exact, i.e. after nearly T iterations
# (bench/half_precision.py: the shipped faces model, 8 samples, newton-scan, bf16-mixed at tol 1e-3 /
# 3e-3 / 5e-3 against 32-true at 1e-3: T = 25 took 20 / 12 / 10 iterations against 9, T = 100
# 51 / 34 / 28 against 10; at 3e-3 x_0 is 1.10x (T = 25) and 1.21x (T = 100) as far from float32
# sequential DDIM as bf16 sequential DDIM is).
UNIT_ROUNDOFF = {"bf16-mixed": 2.0 ** -8, "bf16-true": 2.0 ** -8,
                 "16-mixed": 2.0 ** -11, "16-true": 2.0 ** -11, "16": 2.0 ** -11}


def resolved_precision(device_type: str, precision: Any) -> str:
    """The precision a job computes in on `device_type` (a CPU runs 16-mixed as bf16-mixed)."""
    precision = str(precision)
    return CPU_AUTOCAST_SUBSTITUTE.get(precision, precision) if device_type == "cpu" else precision


def section_precision(section: dict[str, Any] | None) -> str | None:
    """The precision a trainer section computes in here (resolved_precision on the device its
    accelerator picks); None where that accelerator is not here (the Trainer then says why)."""
    section = section or {}
    try:
        device = resolve_device(section.get("accelerator", "auto"))
    except ValueError:
        return None
    return resolved_precision(device.type, section.get("precision", "32-true"))


def tolerance_note(precision: str, tol: float, flag: str) -> str | None:
    """A line for a solver tolerance below what a half `precision` (as resolved) resolves, where
    the solve runs to its iteration limit (UNIT_ROUNDOFF); None otherwise."""
    u = UNIT_ROUNDOFF.get(str(precision))
    if u is None or not tol or tol >= u:
        return None
    return (f"note: {flag} {tol:g} is below what {precision} resolves (its rounding, {u:.1e}): the "
            f"residual stalls near that, so the solve runs to its iteration limit (on the sampling "
            f"chain, nearly T iterations) for no gain; {flag} {u:.0g} stops where it can, or use "
            f"--trainer.precision 32-true")


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
    precision = resolved_precision(device.type, section.get("precision", "32-true"))
    if precision in AUTOCAST:
        return device, torch.float32, torch.autocast(device.type, dtype=AUTOCAST[precision])
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}: use one of "
                         f"{', '.join(list(DTYPES) + list(AUTOCAST))}")
    return device, DTYPES[precision], contextlib.nullcontext()
