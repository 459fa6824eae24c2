"""One entry point for generating images with any solver (sample.py, the trainers, benchmarks)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from deqlit.deq.layer import DEQSampler
from deqlit.deq.solvers import SolverStats
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.sequential import ddim_sample
from deqlit.deq.reduce import LocalReducer

SAMPLERS = ("sequential", "picard", "anderson", "triangular-anderson")


def draw_noise(shape: tuple[int, ...], seq_len: int, eta: float, generator: torch.Generator,
               dtype=torch.float32) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x_T (B, C, H, W) and, when eta > 0, the injected noise (T, B, C, H, W), from one generator."""
    x_T = torch.randn(shape, generator=generator, dtype=dtype)
    noise = torch.randn((seq_len,) + tuple(shape), generator=generator, dtype=dtype) if eta > 0 else None
    return x_T, noise


def generate(model, x_T: torch.Tensor, chain: Chain, solver: str = "sequential",
             noise: Optional[torch.Tensor] = None, max_batch: Optional[int] = None,
             reducer: Optional[LocalReducer] = None,
             **solver_options: Any) -> tuple[torch.Tensor, SolverStats]:
    """x_T (B, C, H, W) -> (x_0 (B, C, H, W), stats) with the sequential chain or a DEQ solver.

    noise (T, B, C, H, W) is the injected noise when chain.eta > 0 (drawn here when None).
    reducer: a time group (deqlit.parallel.DistributedReducer) to shard the chain's rows over its
    processes; every process passes the same x_T and noise and gets the same x_0.
    """
    if solver not in SAMPLERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SAMPLERS)}")
    if reducer is not None and reducer.shards > 1:
        return sharded_generate(model, x_T, chain, solver, noise, max_batch, reducer, solver_options)
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


def sharded_generate(model, x_T: torch.Tensor, chain: Chain, solver: str, noise: Optional[torch.Tensor],
                     max_batch: Optional[int], reducer: LocalReducer,
                     solver_options: dict[str, Any]) -> tuple[torch.Tensor, SolverStats]:
    """generate() over the time shards of `reducer`: x_0 (B, C, H, W) on every process."""
    from deqlit.parallel.sampler import ShardedDEQSampler
    if solver == "sequential":
        raise ValueError("the sequential sampler cannot be sharded over time; use picard, anderson "
                         "or triangular-anderson with time shards")
    if chain.eta > 0 and noise is None:
        raise ValueError("eta > 0 with time shards needs the injected noise (T, B, C, H, W), drawn "
                         "from the same seed on every process (draw_noise)")
    deq = ShardedDEQSampler(model, chain, reducer, solver=solver, solver_options=solver_options,
                            max_batch=max_batch)
    X, stats = deq(x_T, noise)
    return deq.first_state(X), stats
