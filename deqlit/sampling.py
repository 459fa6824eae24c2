"""One entry point for generating images with any solver (sample.py, the trainers, benchmarks)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from deqlit.deq.layer import DEQSampler
from deqlit.deq.solvers import SolverStats
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.sequential import ddim_sample

SAMPLERS = ("sequential", "picard", "anderson", "triangular-anderson")


def draw_noise(shape: tuple[int, ...], seq_len: int, eta: float, generator: torch.Generator,
               dtype=torch.float32) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x_T (B, C, H, W) and, when eta > 0, the injected noise (T, B, C, H, W), from one generator."""
    x_T = torch.randn(shape, generator=generator, dtype=dtype)
    noise = torch.randn((seq_len,) + tuple(shape), generator=generator, dtype=dtype) if eta > 0 else None
    return x_T, noise


def generate(model, x_T: torch.Tensor, chain: Chain, solver: str = "sequential",
             noise: Optional[torch.Tensor] = None, max_batch: Optional[int] = None,
             **solver_options: Any) -> tuple[torch.Tensor, SolverStats]:
    """x_T (B, C, H, W) -> (x_0 (B, C, H, W), stats) with the sequential chain or a DEQ solver.

    noise (T, B, C, H, W) is the injected noise when chain.eta > 0 (drawn here when None).
    """
    if solver not in SAMPLERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SAMPLERS)}")
    if chain.eta > 0 and noise is None:
        noise = torch.randn((chain.T,) + tuple(x_T.shape), dtype=x_T.dtype, device=x_T.device)
    if solver == "sequential":
        callback = solver_options.pop("callback", None)
        step_callback = None if callback is None else (lambda n: callback(n, SolverStats(iterations=n), None))
        x0 = ddim_sample(model, x_T, chain, noise=noise, callback=step_callback)
        stats = SolverStats(iterations=chain.T, converged=True, network_rows=chain.T)
        return x0, stats
    deq = DEQSampler(model, chain, solver=solver, solver_options=solver_options, max_batch=max_batch)
    X, stats = deq(x_T, noise)
    return X[0], stats
