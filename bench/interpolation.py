"""Interpolation benchmark: what the latents are for. Midpoints between the latents of held-out
faces, exact latents (invert.py, the shipped network) against joint-fine-tuned latents
(train.py --task joint, decoded with that run's EMA weights).

    OMP_NUM_THREADS=1 python bench/interpolation.py --exact runs/invert-faces --joint runs/joint-faces

For each set of latents and each path (slerp, lerp), every pair of the 16 latents (120 pairs) is
joined and its midpoint (t = 0.5) decoded through the saved chain (deqlit.commands.interpolate,
the core of sample.py --interpolate). Reported: fd-random of the midpoints to the training faces
divided by the fd-random of as many fresh samples of the same network (several seeds of fresh
samples, to show the spread) and by the fd-random of the control: midpoints of 16 white-noise
latents paired the same way (pairwise midpoints share endpoints, a less varied set that fd-random
scores worse whatever the latents), and the Gaussianity of the midpoint latents (lag-1 autocorrelation,
kurtosis, Shapiro-Wilk rejection rate, largest 8x8 patch correlation) beside the endpoints'.
Target (issue 21): joint latents' midpoints within 10% of fresh samples' fd-random.

Writes bench/results/interpolation.csv, interpolation.json and interpolation.png (one slerp strip of
each set of latents, the same pair), or into --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from bench_csv import write_csv

import torch
from PIL import Image, ImageDraw

from deqlit.commands.interpolate import decode, fine_tuned_weights, midpoint_distances, run_interpolation
from deqlit.config import find_config, load_config
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelation
from deqlit.diffusion.interpolation import interpolate
from deqlit.evaluation.normality import normality
from deqlit.models.build import build_noise_model

RESULTS = Path(__file__).resolve().parent / "results"


def latent_stats(z: torch.Tensor) -> dict[str, float]:
    """Gaussianity of latents (N, C, H, W) in one line (white noise: ~0, 3, ~alpha, small)."""
    stats = normality(z)
    rho = lag1_autocorrelation(z)
    return {"lag1_autocorrelation_mean": float(rho.mean()), "kurtosis_mean": float(kurtosis(z).mean()),
            "shapiro_rejection_rate": stats["shapiro_rejection_rate"],
            "patch_correlation_max": max(stats["patch_correlation"])}


def load_set(run: Path, cfg: dict) -> tuple[torch.nn.Module, dict, str]:
    """(network, latents payload, what the weights are) of a run folder: a joint run decodes with
    its RUN/ema.pt, an inversion run with the shipped network."""
    saved = torch.load(run / "latents.pt", map_location="cpu", weights_only=False)
    weights = fine_tuned_weights(str(run / "latents.pt"))
    if weights is not None and (run / "checkpoints").is_dir():
        model, _, path = build_noise_model(cfg, ckpt=str(weights))
    else:
        model, _, path = build_noise_model(cfg)
    model.requires_grad_(False)
    return model, saved, str(path)


def trained_steps(run: Path) -> int | None:
    """The fine-tuning steps behind a joint run's files (its last checkpoint's), else None."""
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exact", type=Path, default=Path("runs/invert-faces"), help="invert.py run folder")
    p.add_argument("--joint", type=Path, default=Path("runs/joint-faces"), help="train.py --task joint run folder")
    p.add_argument("--methods", nargs="+", default=["slerp", "lerp"])
    p.add_argument("--fresh-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strip-pair", default="0:1")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--latents", type=int, default=None, help="use the first N latents (a quick look)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the results (default bench/results)")
    args = p.parse_args()
    cfg = load_config(find_config("faces"))
    rows, summary, strips = [], {}, {}
    for name, run in (("exact", args.exact), ("joint", args.joint)):
        model, saved, weights = load_set(run, cfg)
        count = len(saved["x_T"]) if args.latents is None else min(args.latents, len(saved["x_T"]))
        pairs = list(itertools.combinations(range(count), 2))
        chain = Chain.from_dict(saved["chain"])
        endpoints = latent_stats(saved["x_T"][:count])
        summary[name] = {"run": str(run), "weights": weights, "timesteps": chain.T, "latents": count,
                         "endpoints": endpoints, "step": trained_steps(run)}
        for method in args.methods:
            begin = time.perf_counter()
            x_T = saved["x_T"].float()
            latents = torch.stack([interpolate(x_T[i], x_T[j], 3, method)[1] for i, j in pairs])
            images = decode(model, latents, chain, "sequential", {})
            # Fresh samples of several seeds: the spread of fresh samples' own fd-random.
            scores = [midpoint_distances(model, images, chain, cfg, seed, pairs, method) for seed in args.fresh_seeds]
            fresh = [s["fresh_fd_random"] for s in scores]
            control = [s["fresh_midpoints_fd_random"] for s in scores]
            mid = scores[0]["midpoints_fd_random"]
            ratios = [mid / f for f in fresh]
            control_ratios = [mid / c for c in control]
            inner = latent_stats(latents)
            entry = {"midpoints_fd_random": mid, "fresh_fd_random": fresh, "ratio_to_fresh": ratios,
                     "ratio_to_fresh_mean": sum(ratios) / len(ratios), "num_midpoints": len(latents),
                     "fresh_midpoints_fd_random": control, "ratio_to_fresh_midpoints": control_ratios,
                     "ratio_to_fresh_midpoints_mean": sum(control_ratios) / len(control_ratios),
                     "control_over_fresh_mean": sum(c / f for c, f in zip(control, fresh)) / len(fresh),
                     "num_reference": scores[0].get("num_reference"), "midpoint_latents": inner,
                     "seconds": time.perf_counter() - begin}
            summary[name][method] = entry
            rows.append({"latents": name, "method": method, "midpoints_fd_random": mid,
                         "fresh_fd_random_mean": sum(fresh) / len(fresh), "ratio_to_fresh": entry["ratio_to_fresh_mean"],
                         "ratio_to_white_midpoints": entry["ratio_to_fresh_midpoints_mean"],
                         "white_midpoints_over_fresh": entry["control_over_fresh_mean"],
                         **{f"midpoint_{k}": v for k, v in inner.items()},
                         **{f"endpoint_{k}": v for k, v in endpoints.items()}})
            print(f"{name} {method}: midpoints fd-random {mid:.4g} = {entry['ratio_to_fresh_mean']:.3f}x fresh "
                  f"samples' ({', '.join(f'{f:.4g}' for f in fresh)}), {entry['ratio_to_fresh_midpoints_mean']:.3f}x "
                  f"white latents' midpoints ({', '.join(f'{c:.4g}' for c in control)}); midpoint latents: lag-1 "
                  f"{inner['lag1_autocorrelation_mean']:.3f}, kurtosis {inner['kurtosis_mean']:.2f}, Shapiro "
                  f"rejection {inner['shapiro_rejection_rate']:.2f} (endpoints "
                  f"{endpoints['lag1_autocorrelation_mean']:.3f}, {endpoints['kurtosis_mean']:.2f}, "
                  f"{endpoints['shapiro_rejection_rate']:.2f})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run_interpolation(model, cfg, saved, args.strip_pair, args.frames, "slerp", Path(tmp))
            i, j = args.strip_pair.split(":")
            strips[name] = Image.open(Path(tmp) / f"strip_{i}_{j}.png").copy()
    joint_slerp = summary["joint"]["slerp"]["ratio_to_fresh_mean"]
    summary["target"] = {"joint_slerp_within_10pct_of_fresh": abs(joint_slerp - 1) <= 0.10,
                         "joint_slerp_ratio": joint_slerp,
                         "exact_slerp_ratio": summary["exact"]["slerp"]["ratio_to_fresh_mean"],
                         "joint_slerp_ratio_to_white_midpoints": summary["joint"]["slerp"]["ratio_to_fresh_midpoints_mean"],
                         "exact_slerp_ratio_to_white_midpoints": summary["exact"]["slerp"]["ratio_to_fresh_midpoints_mean"]}
    write_csv(rows, args.out / "interpolation.csv")
    (args.out / "interpolation.json").write_text(json.dumps(summary, indent=2))
    # Exact above joint: the same pair, the same frames.
    width = max(s.width for s in strips.values())
    canvas = Image.new("RGB", (width, sum(s.height for s in strips.values()) + 24 * len(strips)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for name, strip in strips.items():
        draw.text((4, y + 6), f"{name} latents ({'shipped network' if name == 'exact' else 'fine-tuned network'})",
                  fill="black")
        canvas.paste(strip.convert("RGB"), (0, y + 24))
        y += strip.height + 24
    canvas.save(args.out / "interpolation.png")
    print(f"target (joint slerp midpoints within 10% of fresh): "
          f"{'met' if summary['target']['joint_slerp_within_10pct_of_fresh'] else 'not met'} "
          f"({joint_slerp:.3f}x; exact {summary['target']['exact_slerp_ratio']:.3f}x); wrote "
          f"{args.out / 'interpolation.csv'}, interpolation.json, interpolation.png")


if __name__ == "__main__":
    main()
