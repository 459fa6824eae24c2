"""Sample quality of DEQ-DDIM stopped at a solver tolerance (the paper's Table 2 question: are DEQ
samples as good as sequential ones?), on the shipped faces model.

    python bench/sample_quality.py                         # ~20 min on 2 busy CPU cores, 1 thread
    python bench/sample_quality.py --images 25:8 100:2 --timesteps 25 100   # a quick look

For each T and solver, the same x_T (per-image seeds) goes through sequential DDIM and through the
DEQ solver. One solve to relative residual 1e-3 also yields the result at 1e-2: a solver callback
keeps, per image, x_0 of the first iteration whose residual is below 1e-2 (images stop one by
one). Reported per (T, solver, tol): iterations (mean, max over images), x_0 RMSE against the
sequential x_0, and fd-random / kd-random (Frechet / kernel distance on fixed random conv
features, deqlit.evaluation) of the DEQ samples against the sequential samples and against the
84 training faces, next to the sequential samples' own distance to the faces. Random-feature
distances are a relative measure, NOT comparable with published FIDs; with a few images they carry
a large bias, equal for the two sample sets, so compare DEQ with sequential, not with other tables.
Writes bench/results/sample_quality.csv and sample_quality.png.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from bench_csv import write_csv

import torch

from deqlit.config import find_config, load_config
from deqlit.data.faces import load_faces
from deqlit.diffusion.chain import Chain
from deqlit.evaluation import RANDOM_NOTE, sample_metrics
from deqlit.models.build import build_noise_model
from deqlit.sampling import generate

RESULTS = Path(__file__).resolve().parent / "results"
TOLS = (1e-2, 1e-3)
SOLVER_OPTIONS = {"picard": {}, "anderson": {"m": 5, "lam": 1e-3, "beta": 1.0},
                  "triangular-anderson": {"m": 5, "lam": 1e-3, "beta": 1.0}, "newton-scan": {}}
# Images per T, sized for ~20 min on 2 CPU cores (each DEQ iteration costs T network rows an image).
DEFAULT_IMAGES = {25: 16, 100: 4, 1000: 2}
FIELDS = ("T", "solver", "tol", "images", "iterations_mean", "iterations_max", "x0_rmse_vs_sequential",
          "fd_random_vs_sequential", "kd_random_vs_sequential", "fd_random_vs_faces",
          "kd_random_vs_faces", "seconds")


def x_T_for(count: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Image i starts from seed + i, whatever the batch: (count, C, H, W)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(count)])


@torch.no_grad()
def solve_both_tolerances(model, x_T: torch.Tensor, chain: Chain, solver: str, max_batch: int):
    """One solve to TOLS[-1]; x_0 (B, C, H, W) and iterations (B,) at every tol in TOLS."""
    B = x_T.shape[0]
    loose = TOLS[0]
    first_x0 = torch.full_like(x_T, float("nan"))
    first_iter = torch.zeros(B, dtype=torch.long)

    def watch(n, stats, fx):
        rel = stats.rel_trace[-1].cpu()
        newly = (rel < loose) & (first_iter == 0)
        first_x0[newly] = fx[0][newly].cpu()
        first_iter[newly] = n

    x0, stats = generate(model, x_T, chain, solver, max_batch=max_batch, max_iter=chain.T,
                         tol=TOLS[-1], callback=watch, **SOLVER_OPTIONS[solver])
    stop_iter = torch.tensor(stats.image_iterations)
    # An image that stopped (at T, where the chain is exact) without passing the loose tol first:
    # its final x_0 is what a solve to the loose tol would have returned too.
    missing = first_iter == 0
    first_x0[missing], first_iter[missing] = x0[missing].cpu(), stop_iter[missing]
    return {loose: (first_x0, first_iter), TOLS[-1]: (x0.cpu(), stop_iter)}


def distances(samples: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    values = sample_metrics(samples.clamp(-1, 1), reference, "fd-random,kd-random",
                            kid_subset_size=min(len(samples), len(reference), 100), kid_subsets=50)
    return values["fd-random"], values["kd-random"]


def plot(rows: list[dict], path: Path) -> None:
    """x_0 RMSE against sequential, the change of fd-random to the faces relative to sequential's
    (the number of images differs per T, and so does the bias of fd: compare within a T only),
    and iterations; one line per (solver, tol)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    seq = {int(r["T"]): float(r["fd_random_vs_faces"]) for r in rows if r["solver"] == "sequential"}
    for solver in SOLVER_OPTIONS:
        for tol, style in zip(TOLS, ("--", ":")):
            mine = [r for r in rows if r["solver"] == solver and float(r["tol"]) == tol]
            if not mine:
                continue
            xs = [int(r["T"]) for r in mine]
            label = f"{solver} tol {tol:g}"
            axes[0].plot(xs, [float(r["x0_rmse_vs_sequential"]) for r in mine], style, marker="s", label=label)
            axes[1].plot(xs, [100 * (float(r["fd_random_vs_faces"]) / seq[int(r["T"])] - 1) for r in mine],
                         style, marker="s", label=label)
            axes[2].plot(xs, [float(r["iterations_mean"]) for r in mine], style, marker="s", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="T", ylabel="x_0 RMSE vs sequential DDIM")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xscale="log", xlabel="T", ylabel="fd-random to faces: % over sequential",
                title="random features, not FID")
    axes[2].set(xscale="log", xlabel="T", ylabel="solver iterations (mean over images)")
    axes[0].legend(fontsize=7)
    images = {int(r["T"]): r["images"] for r in rows if r["solver"] == "sequential"}
    fig.suptitle("DEQ samples stopped at a solver tolerance against sequential DDIM from the same x_T, "
                 "shipped faces model; images per T: " + ", ".join(f"{T}: {n}" for T, n in sorted(images.items())))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="+", default=sorted(DEFAULT_IMAGES))
    p.add_argument("--images", nargs="+", default=[f"{k}:{v}" for k, v in DEFAULT_IMAGES.items()],
                   help="images per T as T:N")
    p.add_argument("--solvers", nargs="+", default=list(SOLVER_OPTIONS), choices=list(SOLVER_OPTIONS))
    p.add_argument("--skip-solvers-at-1000", nargs="*", default=["picard", "anderson"],
                   help="solvers left out at T = 1000, where one iteration of 2 images costs 2000 "
                        "network rows (default: only triangular-anderson runs there; pass "
                        "--skip-solvers-at-1000 with no names to run all, ~+25 min)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--out", default=str(RESULTS), help="folder of sample_quality.csv and .png")
    p.add_argument("--replot", help="only redraw the PNG from this CSV")
    p.add_argument("--append", action="store_true",
                   help="keep the rows in --out's CSV of the (T, solver) pairs not run now, e.g. "
                        "--solvers newton-scan --skip-solvers-at-1000 --append adds one solver")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            rows = list(csv.DictReader(f))
        plot(rows, Path(args.replot).with_suffix(".png"))
        return rows
    torch.set_num_threads(args.threads)   # the machine is shared; one thread per process is fastest
    images = {int(k): int(v) for k, v in (item.split(":") for item in args.images)}

    cfg = load_config(find_config("faces"))
    model, abar, _ = build_noise_model(cfg, args.ckpt)
    faces = load_faces("train")
    shape = (model.in_channels, model.resolution, model.resolution)
    rows: list[dict] = []
    for T in args.timesteps:
        n = images.get(T, 2)
        chain = Chain.build(abar, T)
        x_T = x_T_for(n, shape)
        start = time.perf_counter()
        with torch.no_grad():
            x0_seq, _ = generate(model, x_T, chain, "sequential")
        seq_seconds = time.perf_counter() - start
        fd, kd = distances(x0_seq, faces)
        seq_fd = fd
        rows.append({"T": chain.T, "solver": "sequential", "tol": 0.0, "images": n,
                     "iterations_mean": chain.T, "iterations_max": chain.T, "x0_rmse_vs_sequential": 0.0,
                     "fd_random_vs_sequential": 0.0, "kd_random_vs_sequential": 0.0,
                     "fd_random_vs_faces": fd, "kd_random_vs_faces": kd, "seconds": seq_seconds})
        print(f"T={chain.T}: sequential {n} images {seq_seconds:.0f} s, fd-random to faces {fd:.4g}", flush=True)
        solvers = [s for s in args.solvers if not (T >= 1000 and s in args.skip_solvers_at_1000)]
        for solver in solvers:
            start = time.perf_counter()
            results = solve_both_tolerances(model, x_T, chain, solver, args.max_batch)
            seconds = time.perf_counter() - start
            for tol, (x0, iters) in results.items():
                fd_seq, kd_seq = distances(x0, x0_seq)
                fd, kd = distances(x0, faces)
                rmse = float((x0 - x0_seq).pow(2).flatten(1).mean(1).sqrt().mean())
                rows.append({"T": chain.T, "solver": solver, "tol": tol, "images": n,
                             "iterations_mean": float(iters.float().mean()),
                             "iterations_max": int(iters.max()), "x0_rmse_vs_sequential": rmse,
                             "fd_random_vs_sequential": fd_seq, "kd_random_vs_sequential": kd_seq,
                             "fd_random_vs_faces": fd, "kd_random_vs_faces": kd, "seconds": seconds})
                print(f"T={chain.T} {solver:20s} tol {tol:g}: iterations {iters.float().mean():.1f} "
                      f"[max {int(iters.max())}], x0 RMSE vs sequential {rmse:.2e}, fd-random vs "
                      f"sequential {fd_seq:.3g}, vs faces {fd:.4g} (sequential {seq_fd:.4g}, "
                      f"{100 * (fd / seq_fd - 1):+.2f}%)",
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.append and (out / "sample_quality.csv").exists():
        with (out / "sample_quality.csv").open() as f:
            old = list(csv.DictReader(f))
        ran = {(int(r["T"]), r["solver"]) for r in rows}
        rows = [r for r in old if (int(r["T"]), r["solver"]) not in ran] + rows
        order = ["sequential"] + list(SOLVER_OPTIONS)
        rows.sort(key=lambda r: (int(r["T"]), order.index(r["solver"]), -float(r["tol"])))
    write_csv(rows, out / "sample_quality.csv", FIELDS)
    plot(rows, out / "sample_quality.png")
    print(f"{RANDOM_NOTE}\nwrote {out / 'sample_quality.csv'} and {out / 'sample_quality.png'}")
    return rows


if __name__ == "__main__":
    main()
