"""Time-sharding benchmark: per-process solver-state memory, bytes sent and time per solver iteration
for K = 1, 2, 4 time shards (gloo processes on this machine) on the shipped faces model.

    python bench/sharding.py                          # T = 100 and 1000, K = 1 2 4, 3 iterations
    python bench/sharding.py --timesteps 100 --iters 4

For each (T, K), K processes each solve their block of rows with the solver (tol = 0, a fixed
number of iterations, batch 1) and measure, per process:
  state_mb    peak bytes of tensors alive at the end of an iteration, minus those alive before the
              sampler was built (model weights, x_T): iterates, Anderson history, eps cache, noise;
  sent_kb     bytes this process sends per iteration, from the payload of every collective with the
              ring model (all_reduce: 2 (K-1)/K n, all_gather: (K-1) n for n bytes per process);
  seconds     median wall time per iteration (the memory scan excluded).
Figures are the worst process. The ratio sent / state compares the traffic with the chain's state
(T x image). Writes bench/results/sharding.csv or --out (the rows of other solvers already there are kept:
    python bench/sharding.py --solver newton-scan --timesteps 100 adds newton-scan's).
"""
from __future__ import annotations

import argparse
import csv
import gc
import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

from bench_csv import write_csv

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqlit.config import find_config, load_config
from deqlit.diffusion.chain import Chain
from deqlit.models.build import build_noise_model
from deqlit.parallel.distributed import DistributedReducer
from deqlit.deq.reduce import LOCAL
from deqlit.deq.layer import DEQSampler

RESULTS = Path(__file__).resolve().parent / "results"


class CountingReducer(DistributedReducer):
    """DistributedReducer that adds up the bytes each process sends (ring model)."""

    def __init__(self):
        super().__init__()
        self.sent = 0.0

    def sum(self, value):
        self.sent += 2 * (self.shards - 1) / self.shards * value.numel() * value.element_size()
        return super().sum(value)

    def all_totals(self, local_total):
        self.sent += (self.shards - 1) * local_total.numel() * local_total.element_size()
        return super().all_totals(local_total)

    def gather(self, value):
        self.sent += (self.shards - 1) * value.numel() * value.element_size()
        return super().gather(value)


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of all tensors that Python can reach now."""
    seen, total = set(), 0
    with warnings.catch_warnings():     # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def measure(model, abar, T: int, reducer, solver: str, iters: int) -> dict:
    chain = Chain.build(abar, T)
    x_T = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    gc.collect()
    baseline = live_tensor_bytes()
    peaks, stamps = [], []
    scan_end = [0.0]

    def watch(n, stats, fx):
        stamps.append(time.perf_counter() - scan_end[0])     # this iteration, scan of the last excluded
        peaks.append(live_tensor_bytes() - baseline)
        scan_end[0] = time.perf_counter()

    sampler = DEQSampler(model, chain, solver, dict(max_iter=iters, tol=0.0, callback=watch), reducer=reducer)
    sent_before = getattr(reducer, "sent", 0.0)
    with torch.no_grad():
        scan_end[0] = time.perf_counter()
        sampler(x_T)
    sent = getattr(reducer, "sent", 0.0) - sent_before
    return {"state_mb": max(peaks) / 2**20, "sent_kb": sent / iters / 1024,
            "seconds": statistics.median(stamps[1:] if len(stamps) > 1 else stamps),
            "rows": sampler.block.rows, "chain_state_mb": T * x_T.numel() * x_T.element_size() / 2**20}


def worker(rank: int, world: int, port: int, T: int, solver: str, iters: int, threads: int,
           out_dir: str) -> None:
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(threads)
    model, abar, _ = build_noise_model(load_config(find_config("faces")))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=600))
        reducer = CountingReducer()
    else:
        reducer = LOCAL
    result = measure(model, abar, T, reducer, solver, iters)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def run(T: int, K: int, solver: str, iters: int, threads: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(K, port, T, solver, iters, threads, out_dir),
                           nprocs=K, start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(K)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--solver", default="triangular-anderson")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "sharding.csv"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (1: no oversubscription "
                   "when K processes share a few cores)")
    args = p.parse_args()
    rows = []
    for T in args.timesteps:
        base = None
        for K in args.shards:
            per_rank = run(T, K, args.solver, args.iters, args.threads)
            row = {"T": T, "K": K, "solver": args.solver,
                   "rows_per_process": max(r["rows"] for r in per_rank),
                   "state_mb": max(r["state_mb"] for r in per_rank),
                   "sent_kb_per_iter": max(r["sent_kb"] for r in per_rank),
                   "seconds_per_iter": max(r["seconds"] for r in per_rank),
                   "chain_state_mb": per_rank[0]["chain_state_mb"]}
            base = base or row
            row["state_vs_K1"] = row["state_mb"] / base["state_mb"]
            row["sent_vs_chain_state"] = row["sent_kb_per_iter"] / 1024 / row["chain_state_mb"]
            rows.append(row)
            print(f"T={T} K={K}: rows/process {row['rows_per_process']}, state {row['state_mb']:.2f} MB "
                  f"({row['state_vs_K1']:.2f} x K=1), sent {row['sent_kb_per_iter']:.1f} KB/iter "
                  f"({100 * row['sent_vs_chain_state']:.3f}% of the chain state), "
                  f"{row['seconds_per_iter']:.3f} s/iter", flush=True)
    out = Path(args.out)
    if out.exists():                     # keep the other solvers' rows: one solver per run
        with out.open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["solver"] != args.solver] + rows
    print(f"wrote {write_csv(rows, out)}")


if __name__ == "__main__":
    main()
