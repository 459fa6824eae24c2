"""The paper's Table 1 timing on one GPU: sequential DDIM against DEQ-DDIM, one image at a time.

    PYTHONPATH=. python bench/gpu_table1.py                       # ~3-6 min on one modern GPU
    PYTHONPATH=. python bench/gpu_table1.py --device cpu --tiny   # seconds: the same code, tiny nets

For each of the paper's settings (CIFAR-10 UNet at T = 1000, CelebA's at T = 500, LSUN's at
T = 25; random weights: timing does not depend on them) it times, with CUDA events after a
warm-up, batch 1:
- sequential DDIM: T network calls of one image;
- DEQ-DDIM (anderson, triangular-anderson, newton-scan): K solver iterations, each one batched
  network call over all T states (in chunks of --max-batch rows).
A random-weight network is nearly linear, so its fixed point is found in a handful of iterations,
which would flatter the DEQ. So by default every solve runs exactly K = --deq-iters iterations
(tol 0), K = 15: what the trained faces model needs at T = 1000 to reach relative residual 1e-3
(bench/sampling.py: 11 triangular, 15 anderson). --deq-iters 0 instead solves to --tol (at most T
iterations). Reported per row: seconds per image, speed-up over sequential, peak GPU memory, the
iterations run and x_0's RMSE against the sequential x_0 of the same x_T.
Writes bench/results/gpu_table1.csv (or --out) and prints a table in the paper's format.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench_csv import write_csv
from typing import Callable

import torch

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
from deqlit.models.paper_configs import PAPER_CONFIGS
from deqlit.models.unet import DDIMUNet
from deqlit.sampling import generate

RESULTS = Path(__file__).resolve().parent / "results"
SOLVER_OPTIONS = {"anderson": {"m": 5, "lam": 1e-3, "beta": 1.0},
                  "triangular-anderson": {"m": 5, "lam": 1e-3, "beta": 1.0},
                  "newton-scan": {}}        # quasi-Newton, its correction a parallel scan
SOLVERS = tuple(SOLVER_OPTIONS)
# (label, paper config, T): the paper's Table 1 (LSUN church and bedroom share one architecture).
SETTINGS = (("CIFAR10", "cifar10", 1000), ("CelebA", "celeba", 500), ("LSUN", "lsun", 25))
# The paper's figures on an RTX A6000 (seconds per image): DDIM, DEQ-DDIM.
PAPER_SECONDS = {"CIFAR10": (20.16, 2.91), "CelebA": (10.31, 5.12), "LSUN": (1.19, 3.82)}
TINY = dict(ch=16, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
            in_channels=3, resolution=16, resamp_with_conv=True, norm_groups=8)
TINY_T = {"CIFAR10": 12, "CelebA": 8, "LSUN": 5}
FIELDS = ("data", "T", "method", "iterations", "seconds_per_image", "speedup_vs_sequential",
          "peak_memory_mb", "x0_rmse_vs_sequential", "max_batch", "params_m", "device", "paper_seconds",
          "table_seconds_once")


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of `repeats` calls of fn (CUDA events on a GPU) and the last result."""
    times = []
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else math.nan


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def run_setting(label: str, model: torch.nn.Module, T: int, args, device: torch.device) -> list[dict]:
    """Rows of one (data, T): sequential first, then each DEQ solver on the same x_T."""
    chain = Chain.build(alphas_cumprod(linear_betas(1000)), T)
    shape = (1, model.in_channels, model.resolution, model.resolution)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    common = {"data": label, "T": chain.T, "params_m": round(params_m, 2), "device": str(device)}
    paper = PAPER_SECONDS.get(label, (math.nan, math.nan))

    # Warm-up: kernels, cuDNN plans and the allocator for both shapes (1 row; max_batch rows).
    warm_chain = Chain.build(alphas_cumprod(linear_betas(1000)), min(T, 10))
    generate(model, x_T, warm_chain, "sequential")
    reset_peak(device)
    seq_seconds, x0_seq = timed(lambda: generate(model, x_T, chain, "sequential")[0], device, args.repeats)
    rows = [{**common, "method": "DDIM (sequential)", "iterations": chain.T,
             "seconds_per_image": seq_seconds, "speedup_vs_sequential": 1.0,
             "peak_memory_mb": peak_mb(device), "x0_rmse_vs_sequential": 0.0, "max_batch": 1,
             "paper_seconds": paper[0], "table_seconds_once": 0.0}]
    iters = args.deq_iters if args.deq_iters > 0 else chain.T
    tol = 0.0 if args.deq_iters > 0 else args.tol
    for solver in SOLVERS:
        options = SOLVER_OPTIONS[solver]
        table_seconds = 0.0
        if solver == "newton-scan":       # its Jacobian table, once per model and chain: timed apart
            from deqlit.deq.jacobian_table import gain_table
            table_seconds, _ = timed(lambda: gain_table(model, chain, tuple(shape[1:]), x_T.device,
                                                        x_T.dtype)[0], device, 1)
        generate(model, x_T, chain, solver, max_batch=args.max_batch, max_iter=2, tol=0.0, **options)
        reset_peak(device)
        stats_box = {}

        def solve() -> torch.Tensor:
            x0, stats = generate(model, x_T, chain, solver, max_batch=args.max_batch,
                                 max_iter=iters, tol=tol, **options)
            stats_box["stats"] = stats
            return x0

        seconds, x0 = timed(solve, device, args.repeats)
        rows.append({**common, "method": f"DEQ-DDIM ({solver})",
                     "iterations": stats_box["stats"].iterations, "seconds_per_image": seconds,
                     "speedup_vs_sequential": seq_seconds / seconds, "peak_memory_mb": peak_mb(device),
                     "x0_rmse_vs_sequential": float((x0 - x0_seq).pow(2).mean().sqrt()),
                     "max_batch": args.max_batch or chain.T, "paper_seconds": paper[1],
                     "table_seconds_once": table_seconds})
    return rows


def print_table(rows: list[dict]) -> None:
    print("\nTable 1 (single image; random weights; seconds per image [speed-up over DDIM]; peak memory)")
    print("| data | T | DDIM | " + " | ".join(f"DEQ-DDIM {s}" for s in SOLVERS) + " | paper DDIM / DEQ (A6000) |")
    print("|---" * (len(SOLVERS) + 4) + "|")
    for label in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == label]
        cells = [f"{r['seconds_per_image']:.3g} s" +
                 ("" if r["method"].startswith("DDIM") else
                  f" [{r['speedup_vs_sequential']:.1f}x, {r['iterations']} it]") +
                 ("" if math.isnan(r["peak_memory_mb"]) else f", {r['peak_memory_mb']:.0f} MB")
                 for r in mine]
        paper = PAPER_SECONDS.get(label)
        paper_cell = f"{paper[0]} / {paper[1]} s" if paper else ""
        print(f"| {label} | {mine[0]['T']} | " + " | ".join(cells) + f" | {paper_cell} |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny UNet and T (a CPU check of the script)")
    p.add_argument("--deq-iters", type=int, default=15,
                   help="solver iterations per DEQ solve (tol 0); 0 = solve to --tol")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows per network call in the DEQ (default: all T rows at once; e.g. 250 "
                        "bounds memory on a smaller GPU)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    p.add_argument("--data", nargs="+", default=[s[0] for s in SETTINGS], choices=[s[0] for s in SETTINGS])
    p.add_argument("--tf32", action="store_true", help="also allow TF32 in matmuls (cuDNN convs use it by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "gpu_table1.csv"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or check the script with --device cpu --tiny")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    rows = []
    for label, config, T in SETTINGS:
        if label not in args.data:
            continue
        torch.manual_seed(args.seed)
        model = DDIMUNet(**(TINY if args.tiny else PAPER_CONFIGS[config])).to(device).eval()
        T = TINY_T[label] if args.tiny else T
        started = time.perf_counter()
        rows += run_setting(label, model, T, args, device)
        print(f"{label}: T = {T} done in {time.perf_counter() - started:.0f} s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = write_csv(rows, args.out, FIELDS)
    print_table(rows)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
