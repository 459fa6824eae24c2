"""Joint fine-tuning against latents-only inversion, at equal CPU time per method (issue 12).

    python bench/joint.py                                # 16 held-out faces, T = 10, 20 CPU minutes a method
    python bench/joint.py --budget-s 180 --num-images 4  # a quick, preliminary look
    python bench/joint.py --methods ift &                # methods as separate processes (one thread each),
    python bench/joint.py --methods shipped,latents,onestep; python bench/joint.py --collect

The budget is this process's CPU time (time.process_time) with one thread, so other programs on
a shared machine do not change how many steps a method gets; wall time is recorded beside it
(--max-wall-s also stops a method at a wall-clock deadline; its row then shows the CPU it got).
Each method writes bench/results/joint_parts/METHOD.json (+ .pt, its reconstructions); the
results are assembled from the parts present.

Methods (same Gaussian start, same typicality constraint: latents on the sphere + chi2 penalty):
  latents   the network frozen, latents by the 1-step gradient (the paper's inversion)
  onestep   network and latents jointly, 1-step gradient
  ift       network and latents jointly, exact implicit gradient
Each is run by run_joint (the `train.py --task joint` code, configs/faces.yaml's joint section with
the sequential solver) with a CPU-time budget, over which lr_decay anneals both learning rates.
Reported per method, with the EMA weights and the exact (sequential) chain: mean / min PSNR of the
reconstructions, the latents' worst lag-1 autocorrelation and kurtosis deviation, KID of 32 fresh samples (T = 50,
the x_T of bench/model_quality.py) against the 84 training faces, denoising MSE on the training
faces relative to the shipped model's, and triangular-Anderson iterations until x0 is within RMSE
1e-3 of sequential DDIM (fresh x_T; the learned latents with the fine-tuned and with the shipped
weights), and which of issue 12's targets each method meets. Writes bench/results/joint.csv,
joint.json and joint.png (the targets, then one labelled row per method with each face's PSNR;
`--collect --methods ''` redraws it from the parts).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deqlit.config import load_config, parse_value  # noqa: E402
from deqlit.data.faces import load_faces  # noqa: E402
from deqlit.deq.fixed_point import FixedPointMap  # noqa: E402
from deqlit.deq.solvers import solve  # noqa: E402
from deqlit.diffusion.chain import Chain  # noqa: E402
from deqlit.diffusion.schedule import timestep_sequence  # noqa: E402
from deqlit.diffusion.sequential import ddim_sample  # noqa: E402
from deqlit.evaluation import kid  # noqa: E402
from deqlit.models.build import build_noise_model  # noqa: E402
from deqlit.models.loading import load_weights  # noqa: E402
from deqlit.pictures import labelled_grid, save_picture  # noqa: E402

METHODS = {"latents": {"network_lr": 0.0, "grad": "onestep"},
           "onestep": {"grad": "onestep"},
           "ift": {"grad": "ift"}}


@torch.no_grad()
def iterations_to_rmse(model, x_T: torch.Tensor, chain: Chain, target_rmse: float = 1e-3) -> list[int]:
    """Per image: the first triangular-Anderson call whose x0 is within `target_rmse` of sequential
    DDIM (at most T: the solver is exact there)."""
    reference = ddim_sample(model, x_T, chain)
    first = [0] * len(x_T)

    def watch(n, stats, fx):
        rmse = (fx[0] - reference).pow(2).flatten(1).mean(1).sqrt()
        for b, value in enumerate(rmse.tolist()):
            if not first[b] and value <= target_rmse:
                first[b] = n
    fmap = FixedPointMap(model, chain, 64).bind(x_T)
    solve("triangular-anderson", fmap, x_T[None].expand(chain.T, *x_T.shape).clone(), max_iter=chain.T,
          tol=0.0, m=3, callback=watch)
    return [n or chain.T for n in first]


@torch.no_grad()
def model_figures(model, abar, train: torch.Tensor, T: int, kid_timesteps: int = 50) -> dict:
    from deqlit.evaluation import denoising_loss
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(32, 1, 32, 32, generator=gen)
    samples = ddim_sample(model, x_T, Chain.from_sequence(abar, timestep_sequence(kid_timesteps))).clamp(-1, 1)
    fresh_iters = iterations_to_rmse(model, x_T[:8], Chain.build(abar, T))
    return {"kid": kid(train, samples), "denoise_mse_train": denoising_loss(model, train, abar),
            "fresh_iterations_median": float(torch.tensor(fresh_iters, dtype=torch.float).median())}


TARGETS = {"psnr_mean": (">=", 35.0), "autocorr_max": ("<=", 0.05), "kurtosis_maxdev": ("<=", 0.5),
           "kid": ("<=", 0.015), "denoise_ratio_vs_shipped": ("<=", 1.5)}


def targets_met(row: dict) -> dict[str, bool]:
    """Issue 12's targets for joint fine-tuning, per figure (latents-only is scored the same way)."""
    met = {}
    for key, (op, bound) in TARGETS.items():
        if row.get(key) is not None:
            met[key] = row[key] >= bound if op == ">=" else row[key] <= bound
    return met


def run_method(name: str, args, base: dict, shipped, abar, train: torch.Tensor, parts: Path) -> None:
    """One method end to end: run_joint under the CPU budget, then its figures into parts/NAME.*"""
    from deqlit.runs.joint import run_joint
    if name == "shipped":
        row = {"method": name, **model_figures(shipped, abar, train, args.timesteps, args.kid_timesteps)}
        (parts / "shipped.json").write_text(json.dumps({"row": row}, indent=2))
        print(row, flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix=f"bench-joint-{name}-"))
    cfg = copy.deepcopy(base)
    joint = cfg["joint"]
    joint.update({"num_images": args.num_images, "batch_size": min(args.num_images, joint.get("batch_size", 16)),
                  "timesteps": args.timesteps, "init": args.init, "max_steps": 10 ** 6,
                  "solver": "sequential",        # X* by the DDIM loop: the cheapest on one CPU thread
                  "max_process_s": args.budget_s, "max_time_s": args.max_wall_s,
                  "checkpoint_every": 10 ** 6, "image_every": 0,
                  "compare_every": 0, "kid_every": 0, "log_every_n_steps": 10, "progress_bar": False,
                  "out": str(work / name)})
    for item in args.set:
        key, value = item.split("=", 1)
        joint[key] = parse_value(value)
    joint.update(METHODS[name])          # after --set: latents-only keeps its frozen network
    start = time.perf_counter()
    run_joint(cfg)
    wall = time.perf_counter() - start
    metrics = json.loads((work / name / "metrics.json").read_text())
    ema = metrics["ema"]
    model = load_weights(copy.deepcopy(shipped), work / name / "ema.pt").eval()
    latents = torch.load(work / name / "latents.pt", weights_only=True)
    chain = Chain.from_dict(latents["chain"])
    learned_iters = iterations_to_rmse(model, latents["x_T"][:8], chain)
    shipped_iters = iterations_to_rmse(shipped, latents["x_T"][:8], chain)
    with torch.no_grad():
        pictures = ddim_sample(model, latents["x_T"][:8], chain)
    row = {"method": name, "steps": metrics["steps"], "process_seconds": metrics["process_seconds"],
           "wall_seconds": round(wall, 1), "psnr_mean": ema["psnr_mean"], "psnr_min": ema["psnr_min"],
           "psnr_raw_mean": metrics["raw"]["psnr_mean"],
           "autocorr_max": ema["autocorr_max"], "kurtosis_maxdev": ema["kurtosis_maxdev"],
           "learned_iterations_median": float(torch.tensor(learned_iters, dtype=torch.float).median()),
           "learned_iterations_shipped_median": float(torch.tensor(shipped_iters, dtype=torch.float).median()),
           **model_figures(model, abar, train, args.timesteps, args.kid_timesteps)}
    keys = ("grad", "latent_lr", "network_lr", "warmup_steps", "lr_decay", "lr_final", "ema_decay",
            "prior_weight", "typicality_weight", "tau", "solver", "batch_size", "adjoint")
    settings = {k: joint.get(k) for k in keys}
    (parts / f"{name}.json").write_text(json.dumps({"row": row, "joint": settings, "budget_s": args.budget_s,
                                                    "max_wall_s": args.max_wall_s}, indent=2))
    torch.save(pictures.cpu(), parts / f"{name}.pt")
    print(row, flush=True)


def collect(parts: Path, out: Path, targets: torch.Tensor, order=("shipped", "latents", "onestep", "ift")) -> None:
    """joint.csv / joint.json / joint.png from the parts present (target row, then one per method)."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}
    names = [n for n in order if n in found] + sorted(set(found) - set(order))
    rows = [dict(found[n]["row"]) for n in names]
    shipped = found.get("shipped", {}).get("row")
    for row in rows:
        if shipped is not None and row["method"] != "shipped":
            row["denoise_ratio_vs_shipped"] = row["denoise_mse_train"] / shipped["denoise_mse_train"]
        if row["method"] != "shipped":
            row["targets_met"] = targets_met(row)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r if k != "targets_met"}, key=lambda k: (k != "method", k))
    with open(out / "joint.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys + ["targets_met"])
        writer.writeheader()
        for r in rows:
            met = r.get("targets_met")
            writer.writerow({**{k: r.get(k) for k in keys},
                             "targets_met": "" if met is None else " ".join(f"{k}={'met' if v else 'missed'}"
                                                                           for k, v in met.items())})
    settings = {n: {k: v for k, v in found[n].items() if k != "row"} for n in names}
    (out / "joint.json").write_text(json.dumps({"targets": TARGETS, "settings": settings, "rows": rows}, indent=2))
    save_picture(joint_picture(parts, targets, names), out / "joint.png")
    print(f"wrote {out / 'joint.csv'}, joint.json, joint.png (rows: target, {', '.join(names)})")


ROW_LABELS = {"latents": "latents only", "onestep": "joint onestep", "ift": "joint ift"}


def joint_picture(parts: Path, targets: torch.Tensor, names: list[str], count: int = 8):
    """The targets, then one row per method with reconstructions (parts/METHOD.pt, the EMA weights
    and the sequential chain): each tile's PSNR against its target under it, the method's mean over
    its shown faces in the row label. Made from the saved parts alone: `--collect` redraws it."""
    from torchmetrics.functional.image import peak_signal_noise_ratio
    shown = [n for n in names if (parts / f"{n}.pt").exists()]
    n = min(count, len(targets))
    tiles, labels, captions = [list(targets[:n])], ["targets"], [[f"face {k}" for k in range(n)]]
    for name in shown:
        images = torch.load(parts / f"{name}.pt", weights_only=True)[:n].float().clamp(-1, 1)
        psnr = [float(peak_signal_noise_ratio(images[k:k + 1], targets[k:k + 1], data_range=2.0))
                for k in range(len(images))]
        tiles.append(list(images))
        labels.append(f"{ROW_LABELS.get(name, name)}\n{sum(psnr) / len(psnr):.1f} dB mean")
        captions.append([f"{q:.1f} dB" for q in psnr])
    return labelled_grid(tiles, row_labels=labels, captions=captions,
                         title=f"bench/joint.py: {n} held-out faces regenerated by each method's latents "
                               f"and EMA weights; PSNR against the target under each, the mean of the row beside it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=1200.0,
                   help="CPU seconds of this process per method, one thread (default 20 min)")
    p.add_argument("--max-wall-s", type=float, default=None,
                   help="also stop a method's training after this wall time (a deadline on a busy machine)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--methods", default="shipped,latents,onestep,ift",
                   help="comma-separated subset of shipped,latents,onestep,ift ('' with --collect)")
    p.add_argument("--collect", action="store_true", help="only assemble the results from the parts present")
    p.add_argument("--init", default="gaussian", choices=["gaussian", "ddim-inversion"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra joint-section values for every method, e.g. latent_lr=0.02")
    p.add_argument("--kid-timesteps", type=int, default=50, help="T of the fresh samples for KID")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--parts", default=None, help="per-method results (default OUT/joint_parts)")
    args = p.parse_args()
    torch.set_num_threads(1)     # the budget is CPU time: one thread makes it count steps fairly
    out = Path(args.out)
    parts = Path(args.parts) if args.parts else out / "joint_parts"
    parts.mkdir(parents=True, exist_ok=True)
    targets = load_faces("test")[:args.num_images]
    if not args.collect:
        names = [n for n in args.methods.split(",") if n]
        unknown = set(names) - set(METHODS) - {"shipped"}
        if unknown:
            raise SystemExit(f"unknown method(s) {sorted(unknown)}; use shipped, {', '.join(METHODS)}")
        base = load_config(ROOT / "configs" / "faces.yaml")
        shipped, abar, _ = build_noise_model(base)
        train = load_faces("train")
        for name in names:
            run_method(name, args, base, shipped, abar, train, parts)
    collect(parts, out, targets)


if __name__ == "__main__":
    main()
