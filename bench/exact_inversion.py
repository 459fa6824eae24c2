"""Exact inversion benchmark: per step and over all timesteps at once, on the shipped faces model.

    python bench/exact_inversion.py                                  # the defaults below
    python bench/exact_inversion.py --timesteps 10 --images 4 --t1000-images 0

For each T: plain DDIM inversion; exact per step (Anderson or plain iteration, k iterations a step);
exact over all timesteps (Eq. 3 of deq/inverse_map.py) with picard, anderson and
triangular-anderson, from the DDIM-inversion start and, for the best solver, from the Gaussian
flow-map start (no network call). Every latent is regenerated with the sequential DDIM chain
(untimed) and scored by PSNR on [-1, 1] (data range 2) against the face. Reported per point:
solve calls, sequential depth (batched network calls one after another, start included), network
evaluations per image, wall seconds (rough: a shared CPU), mean / median / min PSNR.
Methods from elsewhere (the paper's DEQ gradient method, the baseline) plug in through
`register_method(fn)`: fn(model, faces, chain) -> list of result rows (see `row`).
Writes bench/results/exact_inversion.csv (rewritten after each T, so a partial run keeps its rows) and
exact_inversion.png (median PSNR against depth and evaluations; wall
seconds are in the CSV, rough on a shared CPU); prints the table.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from bench_csv import write_csv
from typing import Callable, Optional

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from deqlit.config import find_config, load_config
from deqlit.data.registry import load_images
from deqlit.deq.inverse_map import exact_invert
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.inverse import ddim_inversion_states, extrapolated_inversion_states
from deqlit.diffusion.sequential import ddim_sample
from deqlit.models.build import build_noise_model

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["T", "images", "method", "solver", "start", "solve_calls", "depth", "evals_per_image",
          "seconds", "mean_psnr", "median_psnr", "min_psnr"]
EXTRA_METHODS: list[Callable] = []


def register_method(fn: Callable[[torch.nn.Module, torch.Tensor, Chain], list[dict]]) -> None:
    """Add a method to every T of the benchmark: fn(model, faces (B, 1, 32, 32), chain) returns
    rows made with `row(...)`, e.g. the inversion module's DEQ gradient method at a few budgets."""
    EXTRA_METHODS.append(fn)


def psnr(model, x_T: torch.Tensor, faces: torch.Tensor, chain: Chain) -> torch.Tensor:
    """PSNR (B,) of the faces regenerated from x_T by the sequential DDIM chain."""
    with torch.no_grad():
        rec = ddim_sample(model, x_T, chain).clamp(-1, 1)
    return torch.stack([peak_signal_noise_ratio(rec[b:b + 1], faces[b:b + 1], data_range=2.0)
                        for b in range(len(faces))])


def row(chain: Chain, method: str, solver: str, start: str, solve_calls: int, depth: int,
        evals: float, seconds: float, scores: torch.Tensor) -> dict:
    print(f"  T = {chain.T}: {method} {solver} {start} calls {solve_calls}: median "
          f"{float(scores.median()):.2f} dB, {seconds:.1f} s", flush=True)
    return {"T": chain.T, "images": len(scores), "method": method, "solver": solver, "start": start,
            "solve_calls": solve_calls, "depth": depth, "evals_per_image": round(float(evals), 1),
            "seconds": round(seconds, 2), "mean_psnr": round(float(scores.mean()), 2),
            "median_psnr": round(float(scores.median()), 2), "min_psnr": round(float(scores.min()), 2)}


class Snapshots:
    """Solver callback: keeps x_T of the consistent iterate f(X) at the chosen calls, with the
    wall time so far (the copy is not timed)."""

    def __init__(self, points: list[int]):
        self.points, self.latents, self.clock = set(points), {}, {}
        self.start, self.paused = time.perf_counter(), 0.0

    def __call__(self, n, stats, fx):
        if n in self.points:
            pause = time.perf_counter()
            self.clock[n] = pause - self.start - self.paused
            self.latents[n] = fx[0].clone()          # rows are x_T, ..., x_1
            self.paused += time.perf_counter() - pause


def all_timesteps(model, faces, chain, solver, start_name, start, start_depth, start_seconds,
                  points, max_batch) -> list[dict]:
    """One solve of max(points) calls; each recorded point scored as if the solve stopped there."""
    snaps = Snapshots(points)
    exact_invert(model, faces, chain, mode="all-timesteps", solver=solver, max_iter=max(points),
                 tol=0.0, init=start, max_batch=max_batch, on_fail="return", callback=snaps)
    return [row(chain, "exact all-timesteps", solver, start_name, n, start_depth + n,
                start_depth + n * chain.T, start_seconds + snaps.clock[n],
                psnr(model, snaps.latents[n], faces, chain)) for n in sorted(snaps.latents)]


def per_step(model, faces, chain, solver, k) -> dict:
    t0 = time.perf_counter()
    x_T, _, rep = exact_invert(model, faces, chain, mode="per-step", solver=solver, max_iter=k,
                               tol=0.0, on_fail="return")
    seconds = time.perf_counter() - t0
    return row(chain, f"exact per-step (k={k})", solver, "ddim", rep.depth - rep.start_depth,
               rep.depth, sum(rep.network_evals) / len(faces), seconds, psnr(model, x_T, faces, chain))


def run_T(model, abar, faces, T, plan: dict, max_batch) -> list[dict]:
    chain = Chain.build(abar, T)
    t0 = time.perf_counter()
    with torch.no_grad():
        ddim_states = ddim_inversion_states(model, faces, chain)
    ddim_seconds = time.perf_counter() - t0
    rows = [row(chain, "ddim inversion", "-", "-", 0, T, T, ddim_seconds,
                psnr(model, ddim_states[-1], faces, chain))]
    for solver in plan["solvers"]:
        rows += all_timesteps(model, faces, chain, solver, "ddim", ddim_states, T, ddim_seconds,
                              plan["points"], max_batch)
    if plan.get("extrapolated_solvers"):
        t0 = time.perf_counter()
        with torch.no_grad():
            ext_states = extrapolated_inversion_states(model, faces, chain)
        ext_seconds = time.perf_counter() - t0
        rows.append(row(chain, "extrapolated inversion", "-", "-", 0, T, T, ext_seconds,
                        psnr(model, ext_states[-1], faces, chain)))
        for solver in plan["extrapolated_solvers"]:
            rows += all_timesteps(model, faces, chain, solver, "extrapolated", ext_states, T,
                                  ext_seconds, plan["points"], max_batch)
    for solver in plan["gaussian_solvers"]:
        rows += all_timesteps(model, faces, chain, solver, "gaussian", "gaussian", 0, 0.0,
                              plan["points"], max_batch)
    for solver in plan["per_step_solvers"]:
        rows += [per_step(model, faces, chain, solver, k) for k in plan["per_step_k"]]
    for fn in EXTRA_METHODS:
        rows += fn(model, faces, chain)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'T':>5} {'B':>3} {'method':<22} {'solver':<20} {'start':<12} {'calls':>5} {'depth':>6} " \
           f"{'evals/img':>9} {'sec':>8} {'mean dB':>8} {'median':>7} {'min':>7}"
    print(head)
    for r in rows:
        print(f"{r['T']:>5} {r['images']:>3} {r['method']:<22} {r['solver']:<20} {r['start']:<12} "
              f"{r['solve_calls']:>5} {r['depth']:>6} {r['evals_per_image']:>9} {r['seconds']:>8.1f} "
              f"{r['mean_psnr']:>8.2f} {r['median_psnr']:>7.2f} {r['min_psnr']:>7.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    Ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(2, len(Ts), figsize=(5 * len(Ts), 9.5), squeeze=False)
    colors: dict[str, tuple] = {}          # one colour per series, the same in every panel
    palette = plt.get_cmap("tab20").colors
    for col, T in enumerate(Ts):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["T"] == T:
                start = f" [{r['start']}]" if r["start"] in ("gaussian", "extrapolated") else ""
                key = r["method"].split(" (")[0] + f" {r['solver']}" + start
                groups.setdefault(key, []).append(r)
        for key, pts in groups.items():
            for ax, x in ((axes[0, col], "depth"), (axes[1, col], "evals_per_image")):
                pts = sorted(pts, key=lambda p: p[x])
                color = colors.setdefault(key, palette[len(colors) % len(palette)])
                ax.plot([p[x] for p in pts], [p["median_psnr"] for p in pts], "o-", label=key, ms=3,
                        color=color)
        for ax, x in ((axes[0, col], "sequential depth (batched network calls, start included)"),
                      (axes[1, col], "network evaluations per image")):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(x)
            ax.set_ylabel("median PSNR of the regenerated faces (dB)")
            ax.set_title(f"T = {T}, {next(r['images'] for r in rows if r['T'] == T)} faces")
            ax.grid(alpha=0.3)
    handles = {line.get_label(): line for ax in axes.flat for line in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v if k in ("method", "solver", "start") else
                 int(float(v)) if k in ("T", "images", "solve_calls", "depth") else float(v)
                 for k, v in r.items()} for r in csv.DictReader(fh)]




def gradient_methods(steps: list[int], only_T: list[int]) -> Callable:
    """The paper's methods from their natural starts, scored after each of `steps` optimization
    steps: DEQ (Algorithm 2, faces config: DDIM-inversion start, triangular Anderson, tau 0.1)
    and the baseline (Algorithm 1, backprop through the chain, same start)."""
    from deqlit.deq.inversion import BatchInverter, InversionSettings

    def run(model, faces, chain) -> list[dict]:
        if chain.T not in only_T:
            return []
        rows = []
        for method in ("deq", "baseline"):
            settings = InversionSettings(
                method=method, init="ddim-inversion", lr=0.01, max_steps=max(steps), seed=0,
                solver="triangular-anderson", solver_options=dict(max_iter=15, tol=1e-2, m=3)).validate()
            start = time.perf_counter()
            inverter = BatchInverter(model, chain, faces, list(range(len(faces))), settings, 64)
            evals, depth = float(chain.T), chain.T          # the DDIM-inversion start
            while not inverter.finished:
                inverter.step()
                k = inverter.step_index
                iterations = float(inverter.iterations_history[:, k - 1].mean())
                if method == "deq":   # solver calls over T - 1 rows, eps(x_T), the gradient row
                    evals += iterations * (chain.T - 1) + 2
                    depth += int(inverter.iterations_history[:, k - 1].max()) + 1
                else:                 # forward and backward through T steps
                    evals += 2 * chain.T
                    depth += 2 * chain.T
                if k in steps:
                    seconds = time.perf_counter() - start
                    rows.append(row(chain, f"{method} gradient ({k} steps)", "adam", "ddim", k, depth,
                                    evals, seconds, psnr(model, inverter.best_latents, faces, chain)))
                    start += time.perf_counter() - start - seconds    # scoring is not timed
        return rows
    return run


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="*", default=[10, 100])
    p.add_argument("--images", type=int, nargs="+", default=[16],
                   help="faces per T (one number for all, or one per --timesteps)")
    p.add_argument("--points", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12],
                   help="solve calls at which the all-timestep solves are scored")
    p.add_argument("--solvers", nargs="*", default=["picard", "anderson", "triangular-anderson"])
    p.add_argument("--extrapolated-solvers", nargs="*", default=["picard", "triangular-anderson"],
                   help="all-timestep solvers started from second-order (extrapolated) DDIM inversion")
    p.add_argument("--gaussian-solvers", nargs="*", default=["triangular-anderson"])
    p.add_argument("--per-step-solvers", nargs="*", default=["anderson", "picard"])
    p.add_argument("--per-step-k", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--t1000-images", type=int, default=2, help="faces at T = 1000 (0: skip)")
    p.add_argument("--t1000-points", type=int, nargs="+", default=[2, 4])
    p.add_argument("--t1000-solvers", nargs="+", default=["picard", "triangular-anderson"])
    p.add_argument("--t1000-per-step-k", type=int, nargs="*", default=[])
    p.add_argument("--max-batch", type=int, default=64, help="rows per network call (CPU: 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gradient-steps", type=int, nargs="*", default=[5, 25],
                   help="score the paper's DEQ gradient method and the baseline after these steps")
    p.add_argument("--gradient-timesteps", type=int, nargs="*", default=[10],
                   help="the T at which the gradient methods run (slow at T = 100 on a CPU)")
    p.add_argument("--out", default=str(RESULTS / "exact_inversion.csv"))
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out (run T values in separate commands)")
    p.add_argument("--replot", action="store_true", help="only print and plot the rows in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gradient_steps:
        register_method(gradient_methods(args.gradient_steps, args.gradient_timesteps))
    model, abar, _ = build_noise_model(load_config(find_config("faces")))
    counts = args.images * len(args.timesteps) if len(args.images) == 1 else args.images
    plan = dict(solvers=args.solvers, gaussian_solvers=args.gaussian_solvers, points=args.points,
                extrapolated_solvers=args.extrapolated_solvers,
                per_step_solvers=args.per_step_solvers, per_step_k=args.per_step_k)
    jobs = [(T, n, plan) for T, n in zip(args.timesteps, counts)]
    if args.t1000_images:
        jobs.append((1000, args.t1000_images, dict(
            solvers=args.t1000_solvers, gaussian_solvers=[], points=args.t1000_points,
            extrapolated_solvers=["picard"],
            per_step_solvers=["anderson"] if args.t1000_per_step_k else [],
            per_step_k=args.t1000_per_step_k)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out) if (args.append or args.replot) and out.exists() else []
    if args.replot:
        print_table(rows)
        plot(rows, out.with_suffix(".png"))
        return rows
    for T, n, job_plan in jobs:
        faces = load_images("faces", "test", 32, 1, limit=n)
        new = run_T(model, abar, faces, T, job_plan, args.max_batch)
        rows += new
        write_csv(rows, out, FIELDS)          # after every T: a run stopped later keeps these rows
        print_table(new)
        plot(rows, out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
