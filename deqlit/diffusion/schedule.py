"""Noise schedules and DDIM coefficients: pure functions on float64 tensors.

Notation (paper, section 3): beta_t, abar_t = prod_{i<=t} (1 - beta_i), abar_{-1} := 1.
A T-step chain visits the timestep subsequence s_0 < s_1 < ... < s_{T-1}.
"""
from __future__ import annotations

import math
import warnings

import torch


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, (num_steps,) float64."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, (num_steps,) float64."""
    def abar(u: float) -> float:
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(schedule: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    if schedule == "linear":
        return linear_betas(num_steps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown beta schedule {schedule!r}: use 'linear' or 'cosine'")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{i<=t} (1 - beta_i), (N,) float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def timestep_sequence(timesteps: int, num_train_steps: int = 1000, skip: str = "uniform",
                      dedupe: bool = True) -> list[int]:
    """The increasing subsequence s_0 < ... < s_{T-1} that a T-step sampler visits.

    `uniform`: s_k = k * (N // T). The reference uses range(0, N, N // T), which has more than T
    entries when T does not divide N; we always return T (the two agree when T divides N).
    `quad`: int(linspace(0, sqrt(0.8 N), T) ** 2), the reference formula. For large T it repeats
    timesteps (T = 1000 has 688 distinct ones). A DDIM step between equal timesteps is the identity
    (abar_prev = abar_t and sigma = 0), so the repeats change nothing but cost network calls:
    with dedupe=True (default) they are dropped, with a warning that says how many steps remain.
    """
    if not 1 <= timesteps <= num_train_steps:
        raise ValueError(f"timesteps must be in [1, {num_train_steps}], got {timesteps}")
    if skip == "uniform":
        stride = num_train_steps // timesteps
        seq = [k * stride for k in range(timesteps)]
    elif skip == "quad":
        grid = torch.linspace(0, math.sqrt(num_train_steps * 0.8), timesteps, dtype=torch.float64)
        seq = [int(v) for v in (grid ** 2).tolist()]
    else:
        raise ValueError(f"unknown skip type {skip!r}: use 'uniform' or 'quad'")
    if dedupe:
        distinct = sorted(set(seq))
        if len(distinct) < len(seq):
            warnings.warn(f"skip={skip!r} with T={timesteps} repeats timesteps; the repeated "
                          f"(identity) steps are dropped, leaving {len(distinct)} steps",
                          stacklevel=2)
        seq = distinct
    return seq


def chain_alphas(abar: torch.Tensor, seq: list[int]) -> torch.Tensor:
    """abar at the chain's states x_0 .. x_T, (T+1,) float64.

    State x_i (i >= 1) lives at timestep s_{i-1}; x_0 is the clean output with abar = 1.
    """
    abar = abar.to(torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64, device=abar.device), abar[seq]])


def ddim_sigmas(chain_abar: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_i for the step x_i -> x_{i-1}, i = 1..T, (T,) float64 (Eq. 13 / DDIM Eq. 16).

    sigma_i = eta * sqrt((1 - abar_i / abar_{i-1}) (1 - abar_{i-1}) / (1 - abar_i)); eta = 1 gives
    DDPM's posterior variance, eta = 0 the deterministic DDIM.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    a_cur, a_prev = chain_abar[1:], chain_abar[:-1]
    ratio = (1 - a_cur / a_prev).clamp(min=0.0)
    return eta * torch.sqrt(ratio * (1 - a_prev) / (1 - a_cur))


def fixed_point_coefficients(chain_abar: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the scaled chain y_i = x_i / sqrt(abar_i) (Eq. 10 and 13).

    One step is y_{i-1} = y_i + c_i eps(x_i) + d_i xi_i with
      c_i = [sqrt(1 - abar_{i-1} - sigma_i^2) - sqrt(abar_{i-1} (1 - abar_i) / abar_i)] / sqrt(abar_{i-1})
      d_i = sigma_i / sqrt(abar_{i-1}).
    Returns (c, d), each (T,) float64, index i-1 for the step out of state x_i.
    """
    a_cur, a_prev = chain_abar[1:], chain_abar[:-1]
    direction = torch.sqrt((1 - a_prev - sigmas ** 2).clamp(min=0.0))
    c = (direction - torch.sqrt(a_prev * (1 - a_cur) / a_cur)) / torch.sqrt(a_prev)
    d = sigmas / torch.sqrt(a_prev)
    return c, d
