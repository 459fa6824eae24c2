"""Joint fine-tuning against latents-only inversion, at equal wall time per method (issue 12).

    python bench/joint.py                                # 16 held-out faces, T = 10, 20 minutes a method
    python bench/joint.py --budget-s 180 --num-images 4  # a quick, preliminary look

Methods (same Gaussian start, same typicality constraint: latents on the sphere + chi2 penalty):
  latents   the network frozen, latents by the 1-step gradient (the paper's inversion)
  onestep   network and latents jointly, 1-step gradient
  ift       network and latents jointly, exact implicit gradient
Each is run by run_joint (the `train.py --task joint` code) with a wall-time budget. Reported per
method, with the EMA weights and the exact (sequential) chain: mean / min PSNR of the reconstructions,
the latents' worst lag-1 autocorrelation and kurtosis deviation, KID of 32 fresh samples (T = 50,
the x_T of bench/model_quality.py) against the 84 training faces, denoising MSE on the training
faces relative to the shipped model's, and triangular-Anderson iterations until x0 is within RMSE
1e-3 of sequential DDIM (fresh x_T and the learned latents). Writes bench/results/joint.csv,
joint.json and joint.png (target | one row per method).
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
import torchvision

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=1200.0, help="wall time per method (default 20 min)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--methods", default="latents,onestep,ift")
    p.add_argument("--init", default="gaussian", choices=["gaussian", "ddim-inversion"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra joint-section values for every method, e.g. latent_lr=0.02")
    p.add_argument("--kid-timesteps", type=int, default=50, help="T of the fresh samples for KID")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    base = load_config(ROOT / "configs" / "faces.yaml")
    shipped, abar, _ = build_noise_model(base)
    train, targets = load_faces("train"), load_faces("test")[:args.num_images]
    rows = [{"method": "shipped", **model_figures(shipped, abar, train, args.timesteps, args.kid_timesteps)}]
    print(rows[0], flush=True)
    pictures = [targets[:8]]
    work = Path(tempfile.mkdtemp(prefix="bench-joint-"))
    for name in args.methods.split(","):
        cfg = copy.deepcopy(base)
        joint = cfg["joint"]
        joint.update({"num_images": args.num_images, "batch_size": args.num_images, "timesteps": args.timesteps,
                      "init": args.init, "max_steps": 10 ** 6, "max_time_s": args.budget_s,
                      "checkpoint_every": 10 ** 6, "image_every": 0, "compare_every": 0, "kid_every": 0,
                      "progress_bar": False, "out": str(work / name)})
        for item in args.set:
            key, value = item.split("=", 1)
            joint[key] = parse_value(value)
        joint.update(METHODS[name])          # after --set: latents-only keeps its frozen network
        from deqlit.lit.run_joint import run_joint
        start = time.perf_counter()
        run_joint(cfg)
        seconds = time.perf_counter() - start
        metrics = json.loads((work / name / "metrics.json").read_text())
        ema = metrics["ema"]
        model = load_weights(copy.deepcopy(shipped), work / name / "ema.pt").eval()
        latents = torch.load(work / name / "latents.pt", weights_only=True)
        chain = Chain.from_dict(latents["chain"])
        learned_iters = iterations_to_rmse(model, latents["x_T"][:8], chain)
        with torch.no_grad():
            pictures.append(ddim_sample(model, latents["x_T"][:8], chain))
        row = {"method": name, "steps": metrics["steps"], "seconds": round(seconds, 1),
               "psnr_mean": ema["psnr_mean"], "psnr_min": ema["psnr_min"],
               "autocorr_max": ema["autocorr_max"], "kurtosis_maxdev": ema["kurtosis_maxdev"],
               "learned_iterations_median": float(torch.tensor(learned_iters, dtype=torch.float).median()),
               **model_figures(model, abar, train, args.timesteps, args.kid_timesteps)}
        row["denoise_ratio_vs_shipped"] = row["denoise_mse_train"] / rows[0]["denoise_mse_train"]
        rows.append(row)
        print(row, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k))
    with open(out / "joint.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    settings = {"budget_s": args.budget_s, "num_images": args.num_images, "timesteps": args.timesteps,
                "init": args.init, "set": args.set, "threads": torch.get_num_threads()}
    (out / "joint.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    grid = torch.cat([p[:8] for p in pictures]).clamp(-1, 1)
    torchvision.utils.save_image((grid + 1) / 2, out / "joint.png", nrow=min(8, len(targets)))
    print(f"wrote {out / 'joint.csv'}, joint.json, joint.png (rows: target, {args.methods})")


if __name__ == "__main__":
    main()
