"""Restoration benchmark: inpainting (a centre box of 25% of the pixels) and 2x super-resolution of
the held-out faces with the shipped model at T = 10, through the DEQ gradient method (Algorithm 2
with the degraded loss) and the baseline (Algorithm 1) at equal CPU time, against references that
use no model: the mean training face in the hole and the harmonic fill (inpainting), bicubic
upsampling and its projection onto A(x) = y (super-resolution).

    OMP_NUM_THREADS=1 python bench/restoration.py --paper-baseline     # 16 faces, ~30 CPU minutes
    OMP_NUM_THREADS=1 python bench/restoration.py --images 4 --init ddim-inversion --name restoration-ddim

Both methods start from the same latents (--init: exact inversion, or DDIM inversion, of the guess
of the whole image: the harmonic fill of the hole, the bicubic upsampling; see deq/degradations.py),
and the start counts in their time. The DEQ method runs --steps Adam steps; the baseline then runs
for the same CPU time of this one thread (equal time on a quiet machine is equal CPU time).
--paper-baseline adds the baseline as published (a Gaussian start, lr 0.01). PSNR of the exact
sequential chain's image of each method's best latent, and of its projection onto A(x) = y
('consistent', super-resolution; inpainting: the known pixels pasted, the same on the hole): on the
unknown pixels (inpainting) and on the whole image (super-resolution). Medians over the faces.
Writes bench/results/NAME.csv (per face), NAME.json (medians, steps, CPU seconds) and NAME.png
(target | degraded | reference | DEQ | baseline, four faces per task).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_csv import write_csv

import torch

from deqlit.config import find_config, load_config
from deqlit.data.registry import load_images
from deqlit.deq.degradations import Degradation
from deqlit.deq.inversion import BatchInverter, InversionSettings
from deqlit.deq.solvers import options_from
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.gaussianity import lag1_autocorrelation
from deqlit.lit.inversion_outputs import masked_psnr
from deqlit.models.build import build_noise_model
from deqlit.pictures import labelled_grid, save_picture

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {"inpaint": dict(task="inpaint", mask="center"), "super-resolution": dict(task="super-resolution", factor=2)}


def psnr_on(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> list[float]:
    """PSNR per image (data range 2) of a (clamped to [-1, 1]) against b, over all pixels or the
    pixels of `where` (B, 1, H, W): invert.py's own score (lit/inversion_outputs.masked_psnr)."""
    return [masked_psnr(a[k:k + 1].clamp(-1, 1).double(), b[k:k + 1].double(),
                        None if where is None else where[k:k + 1]) for k in range(len(a))]


def run_method(model, chain, faces, settings: InversionSettings, steps: int | None,
               budget_s: float | None) -> tuple[dict, float, int, BatchInverter]:
    """Adam steps until `steps` or until `budget_s` CPU seconds; (result, CPU seconds, steps, inverter).
    The clock starts before the inverter is built: the start (DDIM inversion) counts."""
    start = time.process_time()
    inverter = BatchInverter(model, chain, faces, list(range(len(faces))), settings)
    done = 0
    while not inverter.finished:
        inverter.step()
        done += 1
        if steps is not None and done >= steps:
            break
        if budget_s is not None and time.process_time() - start >= budget_s:
            break
    return inverter.result(), time.process_time() - start, done, inverter


def references(task: str, faces: torch.Tensor, train: torch.Tensor, inverter: BatchInverter
               ) -> dict[str, torch.Tensor]:
    """No model. Inpainting: the mean training face in the hole (the issue's reference) and the
    harmonic fill; super-resolution: bicubic upsampling (the issue's) and its projection onto A(x) = y."""
    degradation, observed = inverter.degradation, inverter.observed
    if task == "inpaint":
        unknown = degradation.unknown(faces).expand_as(faces)
        mean_face = torch.where(unknown, train.mean(0, keepdim=True).expand_as(faces), faces)
        harmonic = Degradation(mask=degradation.mask, fill="harmonic").shown(observed, faces)
        return {"mean face": mean_face, "harmonic fill": harmonic}
    bicubic = degradation.shown(observed, faces)
    return {"bicubic": bicubic, "bicubic, consistent": degradation.project(bicubic, observed)}


def median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="Adam steps of the DEQ method")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--init", default="exact", choices=["gaussian", "ddim-inversion", "exact"],
                   help="the start of both methods: exact / ddim-inversion invert the guess (fill / bicubic)")
    p.add_argument("--fill", default="harmonic", choices=["mean", "harmonic"],
                   help="inpainting: the guess of the hole that the ddim-inversion start inverts")
    p.add_argument("--paper-baseline", action="store_true",
                   help="also the baseline from a Gaussian start at the paper's lr 0.01 (Algorithm 1 as published)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--name", default="restoration", help="the results' file name (bench/results/NAME.csv ...)")
    args = p.parse_args()
    cfg = load_config(find_config("faces"))
    model, schedule, _ = build_noise_model(cfg)
    model.requires_grad_(False)
    chain = Chain.build(schedule, args.timesteps)
    faces = load_images("faces", "test", 32, 1, limit=args.images)
    train = load_images("faces", "train", 32, 1, limit=None)
    inv = cfg["inversion"]
    # The shipped inversion settings (configs/faces.yaml): solver, its options, the exact solve's.
    common = dict(max_steps=10_000, seed=0, tau=inv["tau"], solver=inv["solver"], early_stop_loss=0.0,
                  solver_options=options_from(inv["solver"], inv), exact=dict(inv["exact"]))
    rows, pictures, summary = [], [], {}
    for task in args.tasks:
        spec = dict(TASKS[task], fill=args.fill) if task == "inpaint" else TASKS[task]
        runs = {"deq": InversionSettings(method="deq", lr=args.lr, init=args.init, **common, **spec),
                "baseline": InversionSettings(method="baseline", lr=args.lr, init=args.init, **common, **spec)}
        if args.paper_baseline:
            runs["baseline, Gaussian start"] = InversionSettings(method="baseline", lr=0.01, init="gaussian",
                                                                 **common, **spec)
        results, seconds, steps = {}, {}, {}
        for name, settings in runs.items():
            budget = None if name == "deq" else seconds["deq"]
            results[name], seconds[name], steps[name], inverter = run_method(
                model, chain, faces, settings.validate(), args.steps if name == "deq" else None, budget)
        refs = references(task, faces, train, inverter)
        where = results["deq"]["unknown"] if task == "inpaint" else None
        # PSNR of the chain's x_0 (what the latent regenerates) and of its projection onto A(x) = y
        # (equal on the hole for inpainting).
        scores = {"start": psnr_on(results["deq"]["initial"], faces, where),
                  **{name: psnr_on(r["reconstructions"], faces, where) for name, r in results.items()},
                  **{f"{name}, consistent": psnr_on(r["restored"], faces, where) for name, r in results.items()
                     if task != "inpaint"},
                  **{name: psnr_on(image, faces, where) for name, image in refs.items()}}
        med = {k: median(v) for k, v in scores.items()}
        first_ref = next(iter(refs))
        key = "" if task == "inpaint" else ", consistent"
        summary[task] = dict(median_psnr=med, where="unknown pixels" if where is not None else "whole image",
                             deq_minus_baseline_db=med["deq"] - med["baseline"],
                             deq_minus_reference_db=med["deq"] - med[first_ref],
                             consistent_deq_minus_baseline_db=med[f"deq{key}"] - med[f"baseline{key}"],
                             cpu_seconds=seconds, steps=steps,
                             latent_autocorrelation_max={name: lag1_autocorrelation(r["x_T"]).abs().max().item()
                                                         for name, r in results.items()},
                             init=args.init, fill=args.fill if task == "inpaint" else None, lr=args.lr,
                             timesteps=args.timesteps, solver=inv["solver"], images=len(faces))
        for k in range(len(faces)):
            rows.append(dict(task=task, image=k, **{f"psnr[{name}]": v[k] for name, v in scores.items()}))
        shown = results["deq"]["observed_shown"]
        for k in range(min(4, len(faces))):
            pictures.append((task, [faces[k], shown[k], refs[first_ref][k], results["deq"]["restored"][k],
                                    results["baseline"]["restored"][k]],
                             ["", "", f"{scores[first_ref][k]:.1f} dB", f"{scores[f'deq{key}'][k]:.1f} dB",
                              f"{scores[f'baseline{key}'][k]:.1f} dB"]))
        print(f"{task}: median PSNR on {summary[task]['where']}: "
              + ", ".join(f"{name} {v:.2f} dB" for name, v in med.items())
              + f"; steps {steps}, CPU s " + ", ".join(f"{n} {v:.0f}" for n, v in seconds.items())
              + f"; DEQ - baseline {summary[task]['deq_minus_baseline_db']:+.2f} dB", flush=True)
    write_csv(rows, RESULTS / f"{args.name}.csv")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    grid = labelled_grid([tiles for _, tiles, _ in pictures],
                         column_labels=["target", "degraded", "no model", "DEQ", "baseline"],
                         row_labels=[task.replace("super-resolution", "2x SR") for task, _, _ in pictures],
                         captions=[caps for _, _, caps in pictures],
                         title=f"restoration at T = {args.timesteps}, equal CPU time (PSNR: hole / whole image)")
    save_picture(grid, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.csv, {args.name}.json, {args.name}.png")


if __name__ == "__main__":
    main()
