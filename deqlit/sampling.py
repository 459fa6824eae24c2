"""One entry point for generating images with any solver (sample.py, the trainers, benchmarks)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from deqlit.deq.layer import DEQSampler
from deqlit.deq.reduce import LOCAL, LocalReducer
from deqlit.deq.solvers import SOLVERS, SolverStats
from deqlit.diffusion.chain import Chain

SAMPLERS = tuple(SOLVERS)


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
    """x_T (B, C, H, W) -> (x_0 (B, C, H, W), stats) with any registered solver ('sequential'
    included: the chain one state per call through the same map).

    noise (T, B, C, H, W) is the injected noise when chain.eta > 0 (drawn here when None in one
    process; across time shards every process must pass the same, e.g. from draw_noise).
    reducer: a time group (deqlit.parallel.distributed.DistributedReducer) to shard the chain's
    rows over its processes; every process passes the same x_T and noise and gets the same x_0.
    None: one process.
    """
    reducer = LOCAL if reducer is None else reducer
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if chain.eta > 0 and noise is None:
        if reducer.shards > 1:
            raise ValueError("eta > 0 with time shards needs the injected noise (T, B, C, H, W), drawn "
                             "from the same seed on every process (draw_noise)")
        noise = torch.randn((chain.T,) + tuple(x_T.shape), dtype=x_T.dtype, device=x_T.device)
    deq = DEQSampler(model, chain, solver=solver, solver_options=solver_options, max_batch=max_batch,
                     reducer=reducer)
    X, stats = deq(x_T, noise)
    return deq.first_state(X), stats
