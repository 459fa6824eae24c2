"""Where a float64 step's time goes on a CPU (issue 20, item 6): the shipped faces UNet's forward
and backward on the rows one joint step evaluates, in float32 and in float64, profiled per
operator with torch.profiler.

    OMP_NUM_THREADS=1 python bench/precision_profile.py            # 48 rows: 40 chain + 8 prior

A joint step (faces.yaml: T = 10, batch 4, prior batch 8) calls the network on T x 4 chain rows
and on the 8 prior images, forward and backward. This script times exactly that work, a few
repeats after a warm-up, and prints the operators that take most of the float64 time with their
float32 time beside them. Writes bench/results/precision_profile.csv (operator, ms float32,
ms float64, ratio) and prints the whole-step ratio.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_csv import write_csv

import torch
from torch.profiler import ProfilerActivity, profile

from deqlit.config import find_config, load_config
from deqlit.models.build import build_noise_model

RESULTS = Path(__file__).resolve().parent / "results"


def step_work(model: torch.nn.Module, rows: int, dtype: torch.dtype) -> None:
    """One forward and backward of the network on `rows` (1, 32, 32) inputs at random timesteps."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, 32, 32, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (rows,), generator=gen)
    model.zero_grad(set_to_none=True)
    model(x, t).pow(2).mean().backward()


def profile_dtype(model: torch.nn.Module, rows: int, dtype: torch.dtype, repeats: int
                  ) -> tuple[float, dict[str, float]]:
    """(seconds per step, {operator: milliseconds per step of its own time})."""
    net = model.to(dtype)
    step_work(net, rows, dtype)                       # warm-up
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step_work(net, rows, dtype)
    seconds = (time.perf_counter() - start) / repeats
    ops = {e.key: e.self_cpu_time_total / 1000.0 / repeats for e in prof.key_averages()}
    return seconds, ops


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=48, help="network rows of one step (40 chain + 8 prior)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=str(RESULTS / "precision_profile.csv"))
    args = p.parse_args(argv)
    model, _, _ = build_noise_model(load_config(find_config("faces")))
    model.train()
    s32, ops32 = profile_dtype(model, args.rows, torch.float32, args.repeats)
    s64, ops64 = profile_dtype(model, args.rows, torch.float64, args.repeats)
    rows = sorted(({"operator": k, "ms_float32": ops32.get(k, 0.0), "ms_float64": v,
                    "ratio": v / ops32[k] if ops32.get(k) else float("nan")} for k, v in ops64.items()),
                  key=lambda r: -r["ms_float64"])
    total64 = sum(ops64.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rows} rows forward + backward")
    print(f"step: float32 {s32 * 1000:.0f} ms, float64 {s64 * 1000:.0f} ms ({s64 / s32:.1f}x)")
    print(f"{'operator':42s} {'float32 ms':>10s} {'float64 ms':>10s} {'ratio':>6s} {'share64':>7s}")
    for r in rows[:args.top]:
        print(f"{r['operator'][:42]:42s} {r['ms_float32']:10.1f} {r['ms_float64']:10.1f} "
              f"{r['ratio']:6.1f} {100 * r['ms_float64'] / total64:6.1f}%")
    out = Path(args.out)
    print(f"wrote {write_csv(rows, out, ['operator', 'ms_float32', 'ms_float64', 'ratio'])}")
    return rows


if __name__ == "__main__":
    main()
