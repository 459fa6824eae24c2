"""sample.py --interpolate RUN/latents.pt --pairs 0:1,2:3 --frames 9: morphs between saved latents.

Each pair (i, j) of latent rows is joined by a path of `frames` latents (slerp on the sphere where
white noise lives, or lerp for comparison; diffusion/interpolation.py), decoded with the chain
saved with the latents (for a joint fine-tuning run, with its fine-tuned weights: RUN/ema.pt), and
written as a strip PNG per pair whose endpoints are the reconstructions. metrics.json reports the
Gaussianity of every interpolated latent (lag-1 autocorrelation, kurtosis, Shapiro-Wilk, the
patch correlation) and fd-random of the midpoints (t = 0.5) to the training images, beside the
fd-random of as many fresh samples and of the midpoints of white-noise latents paired the same way.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import torch

from deqlit.diffusion.chain import Chain
from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelation
from deqlit.diffusion.interpolation import interpolate, parse_pairs
from deqlit.evaluation.normality import normality
from deqlit.pictures import as_picture, labelled_grid, save_picture
from deqlit.sampling import generate


def fine_tuned_weights(latents_path: str) -> Optional[Path]:
    """RUN/ema.pt beside a joint run's latents (the weights its latents were fitted with), else None."""
    folder = Path(latents_path)
    folder = folder if folder.is_dir() else folder.parent
    ema = folder / "ema.pt"
    return ema if ema.is_file() and (folder / "config.yaml").is_file() else None


def frame_labels(frames: int) -> list[str]:
    """'t = ...' of the frames t = k / (frames - 1): with the fewest decimals (at most 4) that write
    every t exactly, else 3 decimals rounded half up (exact fractions, so that 1/16 and 3/16 round
    the same way, not as binary floats under round-half-even: 0.125 -> 0.12 but 0.375 -> 0.38)."""
    steps = [Fraction(k, frames - 1) for k in range(frames)]
    digits = next((d for d in range(5) if all((t * 10 ** d).denominator == 1 for t in steps)), 3)
    labels = []
    for t in steps:
        scaled = int(t * 10 ** digits + Fraction(1, 2))        # half up (t >= 0)
        whole, part = divmod(scaled, 10 ** digits)
        labels.append(f"t = {whole}" + (f".{part:0{digits}d}" if digits else ""))
    return labels


def check_interpolation(saved: dict[str, Any], pairs_text: str) -> tuple[Chain, list[tuple[int, int]]]:
    """The saved chain and the pairs of rows, or ValueError: latents found with eta > 0, --pairs
    that name no two different rows of the file. Run before anything is written."""
    chain = Chain.from_dict(saved["chain"])
    if chain.eta > 0:
        raise ValueError(f"these latents were found with eta = {chain.eta}: their chain injects noise "
                         f"at every step, and a path between two latents has no noise of its own. "
                         f"Interpolate latents of an eta = 0 run")
    return chain, parse_pairs(pairs_text, len(saved["x_T"]))


@torch.no_grad()
def decode(model, x_T: torch.Tensor, chain: Chain, solver: str, options: dict[str, Any]) -> torch.Tensor:
    """x_0 (N, C, H, W) of latents (N, C, H, W) through the saved chain (eta 0: no noise)."""
    return torch.cat([generate(model, chunk, chain, solver, **options)[0] for chunk in x_T.split(16)])


def pairwise_midpoints(latents: torch.Tensor, pairs: list[tuple[int, int]], method: str) -> torch.Tensor:
    """The t = 0.5 latent of every pair (i, j) of rows of latents (N, C, H, W) -> (len(pairs), C, H, W)."""
    return torch.stack([interpolate(latents[i], latents[j], 3, method)[1] for i, j in pairs])


def midpoint_distances(model, midpoints: torch.Tensor, chain: Chain, cfg: dict, seed: int,
                       pairs: list[tuple[int, int]], method: str) -> dict[str, Any]:
    """fd-random to the training images of the decoded midpoints (one per pair), of as many fresh
    samples, and of the control: the midpoints of fresh latents paired the same way.

    The control matters: midpoints of N latents taken pairwise share their endpoints, so they vary
    less than as many independent samples, and fd-random can score such a set worse even when every
    latent is white noise (bench/interpolation.py, 120 pairs of 16 white latents against 120 fresh
    samples, 3 seeds: 0.89 / 1.36 / 0.94x on the shipped faces model, 1.09 / 1.22 / 1.61x on a joint
    run's network). ratio_to_fresh_midpoints is 1 for latents as typical as white noise.
    """
    from deqlit.evaluation import DatasetMetrics
    if len(midpoints) < 2:
        return {"note": "fd-random needs at least 2 midpoints: pass more --pairs"}
    metrics = DatasetMetrics.from_config("fd-random", cfg, model)
    gen = torch.Generator().manual_seed(seed)
    fresh_x_T = torch.randn(midpoints.shape, generator=gen).to(midpoints)
    fresh = decode(model, fresh_x_T, chain, "sequential", {})
    white_ends = torch.randn((1 + max(max(p) for p in pairs),) + midpoints.shape[1:], generator=gen).to(midpoints)
    control = decode(model, pairwise_midpoints(white_ends, pairs, method), chain, "sequential", {})
    mid, new, ctrl = (metrics(images)["fd-random"] for images in (midpoints, fresh, control))
    return {"midpoints_fd_random": mid, "fresh_fd_random": new, "ratio_to_fresh": mid / new,
            "fresh_midpoints_fd_random": ctrl, "ratio_to_fresh_midpoints": mid / ctrl,
            "num_midpoints": len(midpoints), **metrics.reference}


def run_interpolation(model, cfg: dict, saved: dict[str, Any], pairs_text: str, frames: int, method: str,
                      out: Path, solver: str = "sequential", options: Optional[dict] = None,
                      seed: int = 0) -> dict[str, Any]:
    """Strips, metrics.json and the figures for the pairs of `saved` (a latents payload: x_T, chain)."""
    chain, pairs = check_interpolation(saved, pairs_text)
    x_T_all = saved["x_T"].to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    report: dict[str, Any] = {"method": method, "frames": frames, "timesteps": chain.T, "pairs": []}
    midpoints, interior = [], []
    t_values = torch.linspace(0, 1, frames).tolist()
    for i, j in pairs:
        path = interpolate(x_T_all[i], x_T_all[j], frames, method)             # (F, C, H, W)
        images = decode(model, path, chain, solver, options or {})
        stats = normality(path)
        rho, kurt = lag1_autocorrelation(path).tolist(), kurtosis(path).tolist()
        report["pairs"].append({"rows": [i, j], "t": t_values, "lag1_autocorrelation": rho, "kurtosis": kurt,
                                "shapiro_p": stats["shapiro_p"], "patch_correlation": stats["patch_correlation"]})
        interior.append(path[1:-1])
        midpoints.append(images[frames // 2] if frames % 2 else decode(
            model, interpolate(x_T_all[i], x_T_all[j], 3, method)[1:2], chain, solver, options or {})[0])
        strip = labelled_grid([list(images), [as_picture(z) for z in path]],
                              column_labels=frame_labels(frames), row_labels=["x_0", "x_T"],
                              title=f"{method} from row {i} to row {j} (T = {chain.T})", fit_title=True)
        save_picture(strip, out / f"strip_{i}_{j}.png")
    inner = torch.cat(interior) if interior and interior[0].numel() else x_T_all[:0]
    if len(inner):
        inner_stats = normality(inner)
        rho = lag1_autocorrelation(inner)
        report["interpolated"] = {"count": len(inner), "lag1_autocorrelation_mean": float(rho.mean()),
                                  "lag1_autocorrelation_max": float(rho.abs().max()),
                                  "kurtosis_mean": float(kurtosis(inner).mean()),
                                  "shapiro_rejection_rate": inner_stats["shapiro_rejection_rate"],
                                  "patch_correlation_max": max(inner_stats["patch_correlation"])}
    report["midpoints"] = midpoint_distances(model, torch.stack(midpoints), chain, cfg, seed, pairs, method)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    return report
