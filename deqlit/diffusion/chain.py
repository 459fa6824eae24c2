"""The DDIM chain as one object: its timesteps, alpha-bars, sigmas and fixed-point coefficients.

A T-step chain visits the de-duplicated timestep subsequence s_0 < ... < s_{T-1} of the N training
steps. It is built once from (schedule, T, skip, eta) and then travels as it is: into every map,
solver, sampler and latents file. A latents file carries `Chain.to_dict()`, so the chain that
regenerates its images is the one that found them, never one rebuilt from a step count (the
cifar10 config asks for T = 100 with quad skip, which de-duplicates to 96 steps; rebuilding
"96 quad steps" gives 93 other ones).

Notation (paper, section 3 and Eq. 10-13): state x_i (i >= 1) lives at timestep s_{i-1}, x_0 is the
clean image with abar = 1; y_i = x_i / sqrt(abar_i); one step is y_{i-1} = y_i + c_i eps_i + d_i xi_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from deqlit.diffusion.schedule import (chain_alphas, ddim_sigmas, fixed_point_coefficients,
                                       timestep_sequence)

CHAIN_FORMAT = 1


@dataclass(frozen=True, eq=False)
class Chain:
    """timesteps (T,) s_0 < ... < s_{T-1}; abar (T+1,) float64 of the states x_0..x_T (CPU).

    Derived once: sigmas (T,), c (T,), d (T,) for the step out of x_1..x_T (index i-1).
    `skip` and `requested` record how the chain was asked for (informational only).
    """
    timesteps: tuple[int, ...]
    abar: torch.Tensor
    eta: float = 0.0
    skip: str = "uniform"
    requested: int = 0
    sigmas: torch.Tensor = field(init=False, repr=False)
    c: torch.Tensor = field(init=False, repr=False)
    d: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ValueError("a chain needs at least one timestep")
        # Repeats are allowed (an identity step; Chain.build drops them) but not a decrease.
        if any(b < a for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"chain timesteps must increase, got {list(self.timesteps)[:10]}...")
        if not math.isfinite(self.eta) or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM's variance), got {self.eta}")
        abar = self.abar.detach().to(device="cpu", dtype=torch.float64)
        if abar.shape != (len(self.timesteps) + 1,):
            raise ValueError(f"abar must hold the {len(self.timesteps) + 1} states x_0..x_T, "
                             f"got shape {tuple(abar.shape)}")
        object.__setattr__(self, "abar", abar)
        sigmas = ddim_sigmas(abar, self.eta)
        c, d = fixed_point_coefficients(abar, sigmas)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "d", d)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, schedule_abar: torch.Tensor, timesteps: int, skip: str = "uniform",
              eta: float = 0.0) -> "Chain":
        """The T-step chain of a schedule: schedule_abar (N,) -> Chain with <= T distinct steps."""
        seq = timestep_sequence(timesteps, len(schedule_abar), skip)
        return cls(tuple(seq), chain_alphas(schedule_abar.detach().cpu(), seq), float(eta), skip,
                   timesteps)

    @classmethod
    def from_sequence(cls, schedule_abar: torch.Tensor, seq: list[int], eta: float = 0.0) -> "Chain":
        """A chain over an explicit increasing timestep list."""
        return cls(tuple(int(s) for s in seq), chain_alphas(schedule_abar.detach().cpu(), list(seq)),
                   float(eta), "explicit", len(seq))

    # ---- views ----------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.timesteps)

    @property
    def seq(self) -> list[int]:
        return list(self.timesteps)

    def timestep_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Network time of x_1..x_T, (T,) long."""
        return torch.tensor(self.timesteps, dtype=torch.long, device=device)

    def with_eta(self, eta: float) -> "Chain":
        return Chain(self.timesteps, self.abar, float(eta), self.skip, self.requested)

    def check_schedule(self, schedule_abar: torch.Tensor, tol: float = 1e-6) -> None:
        """Raise if a model's schedule (N,) does not give this chain's alpha-bars."""
        if max(self.timesteps) >= len(schedule_abar):
            raise ValueError(f"the chain visits timestep {max(self.timesteps)} but the model's schedule "
                             f"has {len(schedule_abar)} steps")
        expected = chain_alphas(schedule_abar.detach().cpu(), self.seq)
        if (expected - self.abar).abs().max() > tol:
            raise ValueError("the saved chain's alpha-bars differ from this model's noise schedule: "
                             "the latents were found with another schedule (diffusion section of the "
                             "config); use the config and checkpoint they were made with")

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A small plain dict (lists and numbers): safe for torch.save(weights_only) and YAML."""
        return {"format": CHAIN_FORMAT, "timesteps": list(self.timesteps),
                "abar": [float(a) for a in self.abar], "eta": float(self.eta),
                "skip": self.skip, "requested": int(self.requested)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Chain":
        try:
            return cls(tuple(int(s) for s in data["timesteps"]),
                       torch.tensor(data["abar"], dtype=torch.float64), float(data.get("eta", 0.0)),
                       str(data.get("skip", "explicit")), int(data.get("requested", len(data["timesteps"]))))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a saved chain (expected keys timesteps, abar, eta): {err}") from err

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chain):
            return NotImplemented
        return (self.timesteps == other.timesteps and self.eta == other.eta
                and torch.equal(self.abar, other.abar))

    def __hash__(self) -> int:
        return hash((self.timesteps, self.eta))

    def describe(self) -> str:
        asked = f" (asked {self.requested}, {self.skip})" if self.requested != self.T else f" ({self.skip})"
        return f"T = {self.T}{asked}, eta = {self.eta:g}"
