"""What half precision costs DEQ sampling: solver iterations and x_0 error in bf16-mixed against
32-true, on the shipped faces model.

    OMP_NUM_THREADS=1 python bench/half_precision.py                       # T = 25, 100 (~25 CPU minutes)
    OMP_NUM_THREADS=1 python bench/half_precision.py --timesteps 10 --images 2 --out /tmp/hp.csv   # a minute

For each T, the same 8 x_T (one batch) are sampled by sequential DDIM in float32 (the reference),
by sequential DDIM in bf16-mixed, and by the solver (newton-scan by default) in 32-true at tol 1e-3
and in bf16-mixed at each --tols, the autocast taken from deqlit.devices.placement as sample.py
takes it. Printed and written side by side: the iterations each solve took (the most of its
images) and its x_0 RMSE to the float32 sequential x_0, beside bf16 sequential DDIM's own RMSE.
The iteration counts are what matters (on a GPU a bf16 call is faster; the count multiplies it);
wall times on this CPU say nothing about a GPU and are not reported.
Writes bench/results/half_precision.csv (or --out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench_csv import write_csv

import torch

from deqlit.config import find_config, load_config
from deqlit.devices import placement
from deqlit.diffusion.chain import Chain
from deqlit.models.build import build_noise_model
from deqlit.sampling import generate

RESULTS = Path(__file__).resolve().parent / "results"


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).pow(2).mean().sqrt())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="+", default=[25, 100])
    p.add_argument("--images", type=int, default=8, help="x_T sampled in one batch (seed 3)")
    p.add_argument("--solver", default="newton-scan")
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 3e-3, 5e-3],
                   help="the bf16-mixed solves' tolerances (32-true runs at 1e-3)")
    p.add_argument("--out", default=str(RESULTS / "half_precision.csv"))
    args = p.parse_args()
    model, abar, _ = build_noise_model(load_config(find_config("faces")))
    model.requires_grad_(False)
    rows = []
    for T in args.timesteps:
        chain = Chain.build(abar, T)
        x_T = torch.randn(args.images, 1, 32, 32, generator=torch.Generator().manual_seed(3))
        runs = [("32-true", "sequential", None), ("bf16-mixed", "sequential", None),
                ("32-true", args.solver, 1e-3)] + [("bf16-mixed", args.solver, tol) for tol in args.tols]
        reference = None
        for precision, solver, tol in runs:
            _, _, autocast = placement({"accelerator": "cpu", "precision": precision})
            options = {} if solver == "sequential" else {"tol": tol, "max_iter": T}
            with torch.no_grad(), autocast:
                x0, stats = generate(model, x_T, chain, solver, **options)
            reference = x0 if reference is None else reference
            row = {"T": T, "images": args.images, "precision": precision, "solver": solver,
                   "tol": "" if tol is None else tol,
                   "iterations": T if solver == "sequential" else int(stats.iterations),
                   "x0_rmse_vs_float32_sequential": round(rmse(x0, reference), 6)}
            rows.append(row)
            print(f"T={T:4d} {precision:10s} {solver:12s} tol={row['tol']!s:6s} iterations={row['iterations']:4d} "
                  f"x0 RMSE vs float32 sequential {row['x0_rmse_vs_float32_sequential']:.2e}", flush=True)
        fp32 = next(r for r in rows if r["T"] == T and r["precision"] == "32-true" and r["solver"] != "sequential")
        for r in rows:
            if r["T"] == T and r["precision"] == "bf16-mixed" and r["solver"] != "sequential":
                print(f"T={T}: bf16-mixed at tol {r['tol']:g} takes {r['iterations'] / fp32['iterations']:.1f}x "
                      f"the iterations of 32-true at tol 1e-3")
    print(f"wrote {write_csv(rows, Path(args.out))}")


if __name__ == "__main__":
    main()
