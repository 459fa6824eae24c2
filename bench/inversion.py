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
Writes bench/results/inversion.csv, inversion_loss_vs_time.png and inversion_memory.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from deqlit.config import find_config, load_config
from deqlit.lit.inversion_module import frobenius_loss
from deqlit.lit.run_inversion import build_module

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BUDGET_S = {10: 120.0, 100: 1800.0}   # wall seconds per method; other T run --steps steps


class StepClock(Callback):
    """Wall seconds at the end of each step, and the latents each step's loss belongs to.

    The snapshot is taken before the step (the loss of step k is that of the latents before
    update k) and is not timed: the clock stops while it is copied.
    """

    def __init__(self, budget_s: float | None = None):
        self.stamps, self.latents, self.start, self.paused = [], [], None, 0.0
        self.budget_s = budget_s

    def on_train_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        pause = time.perf_counter()
        if batch_idx > 0:   # step 0 draws its latents inside the step
            self.latents.append(module.latents.clone())
        self.paused += time.perf_counter() - pause

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter() - self.start - self.paused)
        if batch_idx == 0:
            self.latents.append(module.best_latents.clone())   # step 0 is always its best so far
        if self.budget_s is not None and self.stamps[-1] >= self.budget_s:
            trainer.should_stop = True


def config(method: str, T: int, images: int, steps: int, ckpt: str | None, lr: float, init: str) -> dict:
    cfg = load_config(find_config("faces"))
    cfg["inversion"].update(method=method, timesteps=T, num_images=images, batch_size=images,
                            max_steps=steps, early_stop_loss=0.0, lr=lr, init=init)
    if ckpt:
        cfg["checkpoint"]["path"] = ckpt
    return cfg


def run_curve(cfg: dict, budget_s: float | None = None,
              max_points: int = 100) -> tuple[list[float], list[float], float, int]:
    """(mean exact loss, wall seconds at the end of the step) for up to max_points evenly spaced
    steps and the last one; the final mean PSNR; the number of steps taken.

    Losses are recomputed after the run with the exact sequential chain from each step's latents:
    DEQ's own x_0 is only as exact as its solver tolerance.
    """
    module = build_module(cfg)
    clock = StepClock(budget_s)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock])
    steps = module.total_steps()
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(torch.arange(steps)), batch_size=1))
    taken = len(clock.stamps)
    points = sorted(set(range(0, taken, math.ceil(taken / max_points))) | {taken - 1})
    losses = [float(frobenius_loss(module.reconstruct(clock.latents[k], module.batch_noise(slice(None))),
                                   module.targets).mean()) for k in points]
    module.finish_batch(slice(None))    # a budget may stop the run mid-batch: exact metrics anyway
    return losses, [clock.stamps[k] for k in points], module.image_metrics()["mean_psnr"], taken


def measure_memory(method: str, T: int, ckpt: str | None) -> dict:
    """Child process: peak RSS growth (MB) of one optimization step on one face."""
    cfg = config(method, T, 1, 1, ckpt, 0.01, "random")
    cfg["inversion"]["max_iter"] = 3          # memory does not depend on the iteration count
    module = build_module(cfg)
    module.log = lambda *a, **k: None       # no Trainer here
    # ru_maxrss survives fork+exec (it would report the parent's peak); the kernel's per-process
    # high-water mark VmHWM can be reset by writing 5 to /proc/self/clear_refs.
    Path("/proc/self/clear_refs").write_text("5")
    base = proc_status_mb("VmRSS")
    start = time.perf_counter()
    module.training_step(None, 0)           # starts the batch (initial latents) and takes one step
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
    p.add_argument("--memory-child", nargs=2, metavar=("METHOD", "T"), dest="memory_child")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child[0], int(args.memory_child[1]), args.ckpt)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    curves, rows = {}, []
    budgets = args.budget_s if args.budget_s is not None else [DEFAULT_BUDGET_S.get(T) for T in args.timesteps]
    if len(budgets) != len(args.timesteps):
        p.error("give one --budget-s per --timesteps entry")
    for T, budget_s in zip(args.timesteps, budgets):
        for method in ("deq", "baseline"):
            steps = args.steps or (1000 if budget_s else 40)
            losses, stamps, psnr, taken = run_curve(config(method, T, args.images, steps, args.ckpt, args.lr, args.init),
                                             budget_s)
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
        with open(RESULTS / "inversion.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(curves)
    memory = []
    for T in args.memory_timesteps:
        for method in ("deq", "baseline"):
            cmd = [sys.executable, __file__, "--memory-child", method, str(T)] + (["--ckpt", args.ckpt] if args.ckpt else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory.append(json.loads(out))
            print(f"memory T={T:5d} {method:8s} one step grows peak RSS by {memory[-1]['step_peak_growth_mb']:8.1f} MB "
                  f"({memory[-1]['step_seconds']:.1f}s)", flush=True)
    if memory:
        with open(RESULTS / "inversion_memory.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(memory[0]))
            writer.writeheader()
            writer.writerows(memory)
        for T in args.memory_timesteps:
            by = {m["method"]: m["step_peak_growth_mb"] for m in memory if m["T"] == T}
            ratio = by["deq"] / max(by["baseline"], 1e-9)
            print(f"memory T={T}: DEQ/baseline = {ratio:.3f}"
                  f"{'  (target <= 0.10 at T = 1000: ' + ('PASS' if ratio <= 0.1 else 'FAIL') + ')' if T == 1000 else ''}")
    deq100 = [r for r in rows if r["T"] == 100 and r["method"] == "deq"]
    if deq100:
        print(f"DEQ mean PSNR at T = 100: {deq100[0]['final_mean_psnr']:.2f} dB (target >= 35)")


def plot(curves: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    Ts = sorted({T for T, _ in curves})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for method in ("deq", "baseline"):
            losses, stamps = curves[(T, method)]
            ax.semilogy(stamps, losses, label="DEQ-DDIM" if method == "deq" else "baseline (backprop through chain)")
        ax.set_title(f"T = {T}")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("mean loss (squared Frobenius)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "inversion_loss_vs_time.png", dpi=100)


if __name__ == "__main__":
    main()
