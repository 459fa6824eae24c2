"""Inversion benchmark: DEQ (Algorithm 2) against the baseline (Algorithm 1) on the shipped faces
model and held-out faces.

    python bench/inversion.py              # T = 10 and 100, 2 faces, 2 and 30 minutes per method
    python bench/inversion.py --timesteps 10 --budget-s 60 --memory-timesteps 10 100

Part 1, loss against wall time (the paper's Figure 3): both methods invert the same faces from the
same random start, each for the same wall-time budget (--budget-s, one per T; or --steps steps);
the loss of up to 100 evenly spaced steps is recomputed afterwards, untimed, with the exact
sequential chain. Reports each method's min loss within the shorter of the two run times (equal
time budget), the time to reach loss 1.0, and the final mean PSNR.
Part 2, memory of one optimization step for T in --memory-timesteps: each measurement runs in a
fresh process and reports the growth of its peak resident memory (VmHWM, reset after set-up) during one
step over the memory after set-up, so other runs cannot hide it.
Writes bench/results/inversion.csv, inversion_loss_vs_time.png and inversion_memory.csv (or into --out).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench_csv import write_csv

import torch

from deqlit.config import find_config, load_config
from deqlit.data.registry import load_images
from deqlit.deq.degradations import frobenius_loss
from deqlit.deq.inversion import BatchInverter
from deqlit.diffusion.chain import Chain
from deqlit.lit.inversion_outputs import per_image_metrics
from deqlit.runs.inversion import settings_from
from deqlit.models.build import build_noise_model

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BUDGET_S = {10: 120.0, 100: 1800.0}   # wall seconds per method; other T run --steps steps


def config(method: str, T: int, images: int, steps: int, ckpt: str | None, lr: float, init: str,
           solver: str | None = None) -> dict:
    cfg = load_config(find_config("faces"))
    cfg["inversion"].update(method=method, timesteps=T, num_images=images, batch_size=images,
                            max_steps=steps, early_stop_loss=0.0, lr=lr, init=init)
    if solver:
        cfg["inversion"]["solver"] = solver
    if ckpt:
        cfg["checkpoint"]["path"] = ckpt
    return cfg


def make_inverter(cfg: dict, images: int | None = None) -> BatchInverter:
    """The faces config's inversion of the first `images` held-out faces, as one batch."""
    inv = cfg["inversion"]
    model, schedule, _ = build_noise_model(cfg)
    chain = Chain.build(schedule, inv["timesteps"], inv["skip"], inv["eta"])
    faces = load_images("faces", inv.get("split", "test"), 32, 1, limit=images or inv["num_images"])
    return BatchInverter(model.requires_grad_(False), chain, faces, list(range(len(faces))),
                         settings_from(inv), inv.get("max_batch"))


def run_curve(cfg: dict, budget_s: float | None = None,
              max_points: int = 100) -> tuple[list[float], list[float], float, int]:
    """(mean exact loss, wall seconds at the end of the step) for up to max_points evenly spaced
    steps and the last one; the final mean PSNR; the number of steps taken.

    Losses are recomputed after the run with the exact sequential chain from each step's latents
    (taken before the step, untimed): DEQ's own x_0 is only as exact as its solver tolerance.
    """
    inverter = make_inverter(cfg)
    snapshots, stamps, paused = [], [], 0.0
    start = time.perf_counter()
    while not inverter.finished:
        pause = time.perf_counter()
        snapshots.append(inverter.latents.detach().clone())
        paused += time.perf_counter() - pause
        inverter.step()
        stamps.append(time.perf_counter() - start - paused)
        if budget_s is not None and stamps[-1] >= budget_s:
            break
    taken = len(stamps)
    points = sorted(set(range(0, taken, math.ceil(taken / max_points))) | {taken - 1})
    noise = inverter.noise
    losses = [float(frobenius_loss(inverter.exact_x0(snapshots[k], noise), inverter.targets).mean())
              for k in points]
    result = per_image_metrics(inverter.result())
    return losses, [stamps[k] for k in points], sum(m["psnr"] for m in result) / len(result), taken


def measure_memory(method: str, T: int, ckpt: str | None, solver: str | None = None) -> dict:
    """Child process: peak RSS growth (MB) of one optimization step on one face."""
    cfg = config(method, T, 1, 1, ckpt, 0.01, "random", solver)
    cfg["inversion"]["max_iter"] = 3          # memory does not depend on the iteration count
    inverter = make_inverter(cfg, images=1)
    # ru_maxrss survives fork+exec (it would report the parent's peak); the kernel's per-process
    # high-water mark VmHWM can be reset by writing 5 to /proc/self/clear_refs.
    Path("/proc/self/clear_refs").write_text("5")
    base = proc_status_mb("VmRSS")
    start = time.perf_counter()
    inverter.step()
    peak = proc_status_mb("VmHWM")
    return {"method": method, "T": T, "step_peak_growth_mb": peak - base,
            "process_peak_mb": peak, "step_seconds": time.perf_counter() - start}


def proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, nargs="*", default=[10, 100])
    p.add_argument("--memory-timesteps", type=int, nargs="*", default=[10, 100, 1000], dest="memory_timesteps")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--steps", type=int, default=None,
                   help="steps per method (default: 40, or a cap of 1000 under a time budget)")
    p.add_argument("--budget-s", type=float, nargs="*", default=None, dest="budget_s",
                   help="wall seconds per method, one per --timesteps entry: both methods get the same time")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--init", default="random", choices=["random", "ddim-inversion"])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--solver", default=None,
                   help="the DEQ's solver (default: faces.yaml's inversion.solver; README's figures: triangular-anderson)")
    p.add_argument("--memory-child", nargs=2, metavar=("METHOD", "T"), dest="memory_child")
    p.add_argument("--out", default=str(RESULTS), help="folder of the CSVs and the PNG (default bench/results)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child[0], int(args.memory_child[1]), args.ckpt, args.solver)))
        return
    folder = Path(args.out)
    solver = args.solver or load_config(find_config("faces"))["inversion"]["solver"]
    folder.mkdir(parents=True, exist_ok=True)
    curves, rows = {}, []
    budgets = args.budget_s if args.budget_s is not None else [DEFAULT_BUDGET_S.get(T) for T in args.timesteps]
    if len(budgets) != len(args.timesteps):
        p.error("give one --budget-s per --timesteps entry")
    for T, budget_s in zip(args.timesteps, budgets):
        for method in ("deq", "baseline"):
            steps = args.steps or (1000 if budget_s else 40)
            cfg = config(method, T, args.images, steps, args.ckpt, args.lr, args.init, args.solver)
            losses, stamps, psnr, taken = run_curve(cfg, budget_s)
            curves[(T, method)] = (losses, stamps)
            reach = next((s for s, l in zip(stamps, losses) if l <= 1.0), None)
            rows.append({"T": T, "method": method, "steps": taken, "seconds": stamps[-1],
                         "min_loss": min(losses), "time_to_loss_1": reach, "final_mean_psnr": psnr})
            print(f"T={T:4d} {method:8s} min loss {min(losses):9.3f}  {stamps[-1]:7.1f}s  "
                  f"time to loss 1.0: {reach}  PSNR {psnr:.2f} dB", flush=True)
        budget = min(curves[(T, m)][1][-1] for m in ("deq", "baseline"))
        # loss k is measured at the start of step k; with no step done in time, the start counts
        at_budget = {m: min([l for l, s in zip(*curves[(T, m)]) if s <= budget + 1e-9] or curves[(T, m)][0][:1])
                     for m in ("deq", "baseline")}
        for r in rows[-2:]:
            r["min_loss_at_equal_time"] = at_budget[r["method"]]
            r["equal_time_budget_s"] = budget
        ratio = at_budget["baseline"] / at_budget["deq"]
        print(f"T={T}: equal time budget {budget:.1f}s: baseline/DEQ min loss = {ratio:.2f}"
              f"{'  (target >= 20 at T = 100: ' + ('PASS' if ratio >= 20 else 'FAIL') + ')' if T == 100 else ''}")
    if rows:
        write_csv(rows, folder / "inversion.csv")
        plot(curves, folder / "inversion_loss_vs_time.png",
             f"Inversion, loss against wall time\n{args.images} held-out face(s), {args.init} start, lr {args.lr}\n"
             f"DEQ solver {solver}; {torch.get_num_threads()} CPU thread(s)")
    memory = []
    for T in args.memory_timesteps:
        for method in ("deq", "baseline"):
            cmd = [sys.executable, __file__, "--memory-child", method, str(T)] + (["--ckpt", args.ckpt] if args.ckpt else [])
            cmd += ["--solver", args.solver] if args.solver else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory.append(json.loads(out))
            print(f"memory T={T:5d} {method:8s} one step grows peak RSS by {memory[-1]['step_peak_growth_mb']:8.1f} MB "
                  f"({memory[-1]['step_seconds']:.1f}s)", flush=True)
    if memory:
        write_csv(memory, folder / "inversion_memory.csv")
        for T in args.memory_timesteps:
            by = {m["method"]: m["step_peak_growth_mb"] for m in memory if m["T"] == T}
            ratio = by["deq"] / max(by["baseline"], 1e-9)
            print(f"memory T={T}: DEQ/baseline = {ratio:.3f}"
                  f"{'  (target <= 0.10 at T = 1000: ' + ('PASS' if ratio <= 0.1 else 'FAIL') + ')' if T == 1000 else ''}")
    deq100 = [r for r in rows if r["T"] == 100 and r["method"] == "deq"]
    if deq100:
        print(f"DEQ mean PSNR at T = 100: {deq100[0]['final_mean_psnr']:.2f} dB (target >= 35)")


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    Ts = sorted({T for T, _ in curves})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5 * len(Ts), 4.6), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for method in ("deq", "baseline"):
            losses, stamps = curves[(T, method)]
            ax.semilogy(stamps, losses, label="DEQ-DDIM" if method == "deq" else "baseline (backprop through chain)")
        ax.set_title(f"T = {T}")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("mean loss (squared Frobenius)")
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
