"""Sequential samplers: DDIM (any eta) and DDPM ancestral sampling, and DDIM inversion.

These are the oracles for the DEQ solvers and the baselines of the benchmarks. They are written
in the usual predict-x0 form (not the scaled cumulative sum that the fixed-point map uses), so a
test that compares the two checks one formulation against an independent one.

Shapes: x_T (B, C, H, W); noise for eta > 0 is (T, B, C, H, W), row i-1 used by the step out of x_i.
The chain's coefficients are Python floats read from its CPU tensors, so nothing here syncs with
an accelerator.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from deqlit.diffusion.chain import Chain

NoiseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_cur: float, a_prev: float, sigma: float,
              noise: Optional[torch.Tensor]) -> torch.Tensor:
    """One DDIM step x_i -> x_{i-1} (DDIM Eq. 12)."""
    x0_pred = (x - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
    direction = max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
    out = a_prev ** 0.5 * x0_pred + direction
    if sigma > 0:
        out = out + sigma * noise
    return out


def step_time(chain: Chain, i: int, x: torch.Tensor) -> torch.Tensor:
    """The network time of state x_i for every image of x, (B,) long on x's device."""
    return torch.full((x.shape[0],), chain.timesteps[i - 1], device=x.device, dtype=torch.long)


def ddim_sample(model: NoiseModel, x_T: torch.Tensor, chain: Chain,
                noise: Optional[torch.Tensor] = None, return_all: bool = False,
                callback: Optional[Callable[[int], None]] = None,
                step: Optional[Callable[[NoiseModel, torch.Tensor, torch.Tensor], torch.Tensor]] = None):
    """Run the T-step DDIM chain from x_T (at timestep s_{T-1}) down to the clean x_0.

    Returns x_0 (B, C, H, W), or with return_all the states x_0..x_{T-1} stacked (T, B, C, H, W).
    `noise` (T, B, ...) is the injected noise xi; drawn with torch.randn when eta > 0 and None.
    `step(model, x, t) -> eps` replaces the plain call, e.g. with gradient checkpointing.
    """
    T = chain.T
    abar, sigmas = chain.abar.tolist(), chain.sigmas.tolist()
    if chain.eta > 0 and noise is None:
        noise = torch.randn((T,) + tuple(x_T.shape), dtype=x_T.dtype, device=x_T.device)
    states = [None] * T
    x = x_T
    for i in range(T, 0, -1):
        t = step_time(chain, i, x)
        eps = model(x, t) if step is None else step(model, x, t)
        x = ddim_step(x, eps, abar[i], abar[i - 1], sigmas[i - 1], None if noise is None else noise[i - 1])
        states[i - 1] = x
        if callback is not None:
            callback(T - i + 1)
    return torch.stack(states) if return_all else x


def ddpm_sample(model: NoiseModel, x_T: torch.Tensor, betas: torch.Tensor,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all N training steps with the posterior variance beta~_t.

    Uses the posterior-mean form mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t); with
    the same noise this equals ddim_sample(eta=1) over the full sequence 0..N-1.
    `noise` is (N, B, C, H, W), row t used by the step out of timestep t.
    """
    betas = betas.to(torch.float64).cpu()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    n = len(betas)
    if noise is None:
        noise = torch.randn((n,) + tuple(x_T.shape), dtype=x_T.dtype, device=x_T.device)
    x = x_T
    for t in range(n - 1, -1, -1):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x, tt)
        mean = (x - float(betas[t] / (1 - abar[t]).sqrt()) * eps) / float(alphas[t].sqrt())
        if t > 0:
            var = float(betas[t] * (1 - abar[t - 1]) / (1 - abar[t]))
            x = mean + var ** 0.5 * noise[t]
        else:
            x = mean
    return x


def ddim_encode(model: NoiseModel, x0: torch.Tensor, chain: Chain) -> torch.Tensor:
    """Deterministic DDIM inversion: run the eta = 0 chain backwards, x_0 -> x_T (B, C, H, W).

    Each step reuses the noise predicted at the current state, x_i = sqrt(abar_i) x0_pred +
    sqrt(1 - abar_i) eps(x_{i-1}); exact in the limit of small steps, a good start for inversion.
    """
    abar = chain.abar.tolist()
    x = x0
    for i in range(1, chain.T + 1):
        eps = model(x, step_time(chain, i, x))
        a_prev, a_cur = abar[i - 1], abar[i]
        x0_pred = (x - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
        x = a_cur ** 0.5 * x0_pred + (1 - a_cur) ** 0.5 * eps
    return x
