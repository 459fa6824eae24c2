"""One entry point for generating images with any solver (sample.py, the trainers, benchmarks)."""
from __future__ import annotations

from typing import Any, Callable, Optional

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
             reducer: Optional[LocalReducer] = None, batch_size: Optional[int] = None,
             done: Optional[dict[int, tuple[torch.Tensor, SolverStats]]] = None,
             on_batch: Optional[Callable[[int, torch.Tensor, SolverStats], None]] = None,
             **solver_options: Any) -> tuple[torch.Tensor, SolverStats]:
    """x_T (B, C, H, W) -> (x_0 (B, C, H, W), stats) with any registered solver ('sequential'
    included: the chain one state per call through the same map).

    noise (T, B, C, H, W) is the injected noise when chain.eta > 0 (drawn here when None in one
    process; across time shards every process must pass the same, e.g. from draw_noise).
    reducer: a time group (deqlit.parallel.distributed.DistributedReducer) to shard the chain's
    rows over its processes; every process passes the same x_T and noise and gets the same x_0.
    None: one process.
    batch_size: images per solve (None: all B at once). A solve holds T states of each of its
    images, several times over, so a large B (FID needs thousands) is solved in consecutive
    batches; every image stops on its own (solvers._run), so x_0 does not depend on batch_size,
    and the stats are combined over the batches (combine_stats). done: batches finished earlier
    (index -> (x_0, stats)), taken as they are; on_batch(index, x_0, stats) after each batch solved
    here (sample.py saves them: runs/sample_batches.py).
    """
    reducer = LOCAL if reducer is None else reducer
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (images per solve) or None, got {batch_size}")
    if chain.eta > 0 and noise is None:
        if reducer.shards > 1:
            raise ValueError("eta > 0 with time shards needs the injected noise (T, B, C, H, W), drawn "
                             "from the same seed on every process (draw_noise)")
        noise = torch.randn((chain.T,) + tuple(x_T.shape), dtype=x_T.dtype, device=x_T.device)
    deq = DEQSampler(model, chain, solver=solver, solver_options=solver_options, max_batch=max_batch,
                     reducer=reducer)
    size = x_T.shape[0] if batch_size is None else batch_size
    results, all_stats = [], []
    for index, start in enumerate(range(0, x_T.shape[0], size)):
        if done and index in done:
            x0, stats = done[index]
            results.append(x0.to(device=x_T.device, dtype=x_T.dtype))
            all_stats.append(stats)
            continue
        batch = slice(start, start + size)
        X, stats = deq(x_T[batch], None if noise is None else noise[:, batch])
        results.append(deq.first_state(X))
        all_stats.append(stats)
        if on_batch is not None:
            on_batch(index, results[-1], stats)
    if len(results) == 1:
        return results[0], all_stats[0]
    return torch.cat(results), combine_stats(all_stats)


def combine_stats(parts: list[SolverStats]) -> SolverStats:
    """One SolverStats for consecutive solves of disjoint image batches, as one solve of all the
    images would read: per-image lists joined in order, iterations the most any batch took, the
    per-call traces the worst image among the batches still running at that call, network_rows
    the mean per image, converged / exact_by_depth only if every batch is."""
    def worst_per_call(traces: list[list[float]]) -> list[float]:
        calls = max(len(t) for t in traces)
        return [max(t[k] for t in traces if k < len(t)) for k in range(calls)]
    images = [len(p.image_iterations) for p in parts]
    rows = [p.row_residual for p in parts if p.row_residual]
    return SolverStats(
        iterations=max(p.iterations for p in parts),
        converged=all(p.converged for p in parts),
        abs_residual=worst_per_call([p.abs_residual for p in parts]),
        rel_residual=worst_per_call([p.rel_residual for p in parts]),
        row_residual=[max(r) for r in zip(*rows)] if len(rows) == len(parts) else [],
        image_residual=[r for p in parts for r in p.image_residual],
        image_iterations=[n for p in parts for n in p.image_iterations],
        network_rows=round(sum(p.network_rows * n for p, n in zip(parts, images)) / max(1, sum(images))),
        exact_by_depth=all(p.exact_by_depth for p in parts))
