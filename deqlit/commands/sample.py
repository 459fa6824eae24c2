"""sample.py: generate images from x_T with DEQ-DDIM (or the sequential chain) and report figures."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torchvision
from tqdm import tqdm

from deqlit.cli import parse
from deqlit.diffusion.schedule import timestep_sequence
from deqlit.evaluation import DatasetMetrics, format_metrics
from deqlit.models.build import build_noise_model
from deqlit.sampling import SAMPLERS, draw_noise, generate

FLAGS = {"timesteps": "sampling.timesteps", "skip": "sampling.skip", "eta": "sampling.eta",
         "solver": "sampling.solver", "max_iter": "sampling.max_iter", "tol": "sampling.tol",
         "num_images": "sampling.num_images", "seed": "sampling.seed", "out": "sampling.out",
         "ckpt": "checkpoint.path", "max_batch": "sampling.max_batch"}
SOLVER_KEYS = ("max_iter", "tol", "m", "lam", "beta", "freeze")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample with DEQ-DDIM. Any config key can be "
                                "overridden as --section.key value.")
    p.add_argument("--ckpt", help="weights (default: checkpoint.path of the config)")
    p.add_argument("--timesteps", type=int, help="T, the number of DDIM steps")
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--eta", type=float, help="0 = DDIM / DEQ-DDIM; > 0 = DEQ-sDDIM")
    p.add_argument("--solver", choices=SAMPLERS)
    p.add_argument("--max-iter", type=int, dest="max_iter")
    p.add_argument("--tol", type=float)
    p.add_argument("--num-images", type=int, dest="num_images")
    p.add_argument("--max-batch", type=int, dest="max_batch", help="rows per network call")
    p.add_argument("--seed", type=int)
    p.add_argument("--latents", help="a latents .pt written by invert.py: regenerate its images")
    p.add_argument("--compare-sequential", action="store_true", dest="compare",
                   help="also run the sequential chain on the same x_T and noise and compare")
    p.add_argument("--out", help="output folder")
    p.add_argument("--metrics", help="comma-separated distances to --ref-data written into "
                   "metrics.json: fid, kid (need --fid-weights), fd-random, kd-random (offline)")
    p.add_argument("--ref-data", dest="ref_data", help="dataset for --metrics (default: --data)")
    p.add_argument("--fid-weights", dest="fid_weights", help="local Inception weights file for "
                   "fid/kid (default: evaluation.fid_weights of the config)")
    return p


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def load_latents(path: str) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "x_T" not in data:
        raise ValueError(f"{path} is not a latents file from invert.py (expected a dict with 'x_T')")
    return data["x_T"].float(), data.get("noise"), data.get("settings", {})


def main(argv: Optional[list[str]] = None) -> dict:
    args, cfg = parse(build_parser(), argv, FLAGS)
    s = cfg["sampling"]
    model, abar, ckpt_path = build_noise_model(cfg)
    # --metrics: built now, so that missing weights or reference data fail before sampling
    quality = (DatasetMetrics.from_config(args.metrics, cfg, model, args.ref_data, args.fid_weights)
               if args.metrics else None)
    torch.manual_seed(s["seed"])
    if args.latents:
        x_T, noise, saved = load_latents(args.latents)
        for key in ("timesteps", "skip", "eta"):   # regenerate with the chain they were found for
            if key in saved and getattr(args, key) is None:
                s[key] = saved[key]
    seq_len = len(timestep_sequence(s["timesteps"], len(abar), s["skip"]))
    if not args.latents:
        shape = (s["num_images"], model.in_channels, model.resolution, model.resolution)
        x_T, noise = draw_noise(shape, seq_len, s["eta"], torch.Generator().manual_seed(s["seed"]))
    elif s["eta"] > 0 and noise is None:
        noise = torch.randn((seq_len,) + tuple(x_T.shape))
    options = {k: s[k] for k in SOLVER_KEYS if k in s} if s["solver"] != "sequential" else {}

    bar = tqdm(total=min(s["max_iter"], seq_len) if s["solver"] != "sequential" else seq_len,
               desc=f"{s['solver']} T={seq_len}", unit="it")

    def on_iteration(n, stats, fx):
        bar.update(1)
        if stats.rel_residual:
            bar.set_postfix(residual=f"{stats.rel_residual[-1]:.2e}")

    start = time.perf_counter()
    with torch.no_grad():
        x0, stats = generate(model, x_T, abar, s["timesteps"], s["skip"], s["eta"], s["solver"],
                             noise=noise, max_batch=s.get("max_batch"), callback=on_iteration,
                             **options)
    seconds = time.perf_counter() - start
    bar.close()

    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    nrow = max(1, int(math.ceil(math.sqrt(x0.shape[0]))))
    torchvision.utils.save_image((x0.clamp(-1, 1) + 1) / 2, out / "samples.png", nrow=nrow)
    metrics = {
        "solver": s["solver"], "timesteps": seq_len, "timesteps_requested": s["timesteps"],
        "skip": s["skip"], "eta": s["eta"], "num_images": int(x0.shape[0]), "seed": s["seed"],
        "checkpoint": str(ckpt_path), "iterations": stats.iterations, "nfe": stats.iterations,
        "network_evals_per_image": stats.network_rows, "converged": stats.converged,
        "final_residual": stats.rel_residual[-1] if stats.rel_residual else 0.0,
        "residual_trace": stats.rel_residual, "abs_residual_trace": stats.abs_residual,
        "seconds": seconds,
    }
    if args.compare:
        start = time.perf_counter()
        with torch.no_grad():
            x0_seq, _ = generate(model, x_T, abar, s["timesteps"], s["skip"], s["eta"],
                                 "sequential", noise=noise)
        metrics["sequential_seconds"] = time.perf_counter() - start
        metrics["x0_rmse_vs_sequential"] = float((x0 - x0_seq).pow(2).mean().sqrt())
        metrics["x0_psnr_vs_sequential"] = psnr(x0.clamp(-1, 1), x0_seq.clamp(-1, 1))
        torchvision.utils.save_image((x0_seq.clamp(-1, 1) + 1) / 2, out / "samples_sequential.png",
                                     nrow=nrow)
    if quality is not None:
        metrics.update(quality(x0))
        print(format_metrics(metrics))
    torch.save({"x_T": x_T, "noise": noise, "x0": x0}, out / "samples.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'samples.png'} and {out / 'metrics.json'}: {stats.iterations} iterations, "
          f"residual {metrics['final_residual']:.2e}, {seconds:.1f} s")
    if args.compare:
        print(f"sequential: {metrics['sequential_seconds']:.1f} s, x0 RMSE vs sequential "
              f"{metrics['x0_rmse_vs_sequential']:.2e} (PSNR {metrics['x0_psnr_vs_sequential']:.1f} dB)")
    return metrics
