"""sample.py: generate images from x_T with DEQ-DDIM (or the sequential chain) and report figures."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm import tqdm

from deqlit.cli import parse, positive_int
from deqlit.deq.solvers import options_from
from deqlit.devices import placement
from deqlit.diffusion.chain import Chain
from deqlit.evaluation import DatasetMetrics, format_metrics
from deqlit.guards import NonFiniteError, first_nonfinite
from deqlit.runs.guards import check_output_dir
from deqlit.models.build import build_noise_model
from deqlit.parallel.launch import gather_over_data
from deqlit.runs.latents import read_latents
from deqlit.runs.launch import prepare_launch, process_mesh
from deqlit.sampling import SAMPLERS, draw_noise, generate

FLAGS = {"timesteps": "sampling.timesteps", "skip": "sampling.skip", "eta": "sampling.eta",
         "solver": "sampling.solver", "max_iter": "sampling.max_iter", "tol": "sampling.tol",
         "num_images": "sampling.num_images", "seed": "sampling.seed", "out": "sampling.out",
         "ckpt": "checkpoint.path", "max_batch": "sampling.max_batch"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample with DEQ-DDIM. Any config key can be "
                                "overridden as --section.key value; device and precision as "
                                "--trainer.accelerator cpu|gpu|auto, --trainer.precision 64-true.")
    p.add_argument("--ckpt", help="weights (default: checkpoint.path of the config)")
    p.add_argument("--timesteps", type=positive_int, help="T, the number of DDIM steps")
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--eta", type=float, help="0 = DDIM / DEQ-DDIM; > 0 = DEQ-sDDIM")
    p.add_argument("--solver", choices=SAMPLERS)
    p.add_argument("--max-iter", type=positive_int, dest="max_iter")
    p.add_argument("--tol", type=float)
    p.add_argument("--num-images", type=positive_int, dest="num_images")
    p.add_argument("--max-batch", type=positive_int, dest="max_batch", help="rows per network call")
    p.add_argument("--seed", type=int)
    p.add_argument("--latents", help="latents of invert.py or train.py --task joint (RUN/latents.pt "
                   "or the run folder, part files included): regenerate the first --num-images "
                   "images with the chain (and noise) saved with them")
    p.add_argument("--interpolate", metavar="LATENTS", help="morph between pairs of saved latents "
                   "(a file or run folder as for --latents; a joint run's own ema.pt weights are used "
                   "unless --ckpt is given): strip_I_J.png per pair and metrics.json")
    p.add_argument("--pairs", default="0:1", help="with --interpolate: rows to join, e.g. 0:1,2:3")
    p.add_argument("--frames", type=positive_int, default=9, help="with --interpolate: images per strip")
    p.add_argument("--interp", choices=["slerp", "lerp"], default="slerp",
                   help="with --interpolate: great circle (slerp, white noise's sphere) or straight line")
    p.add_argument("--compare-sequential", action="store_true", dest="compare",
                   help="also run the sequential chain on the same x_T and noise and compare")
    p.add_argument("--out", help="output folder")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")
    p.add_argument("--metrics", help="comma-separated distances to --ref-data written into "
                   "metrics.json: fid, kid (need --fid-weights), fd-random, kd-random (offline)")
    p.add_argument("--ref-data", dest="ref_data", help="dataset for --metrics (default: --data)")
    p.add_argument("--fid-weights", dest="fid_weights", help="local Inception weights file for "
                   "fid/kid (default: evaluation.fid_weights of the config)")
    return p


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (data range 2), as a float."""
    return float(peak_signal_noise_ratio(a.clamp(-1, 1).double(), b.clamp(-1, 1).double(), data_range=2.0))


def chosen_chain(args: argparse.Namespace, s: dict, schedule: torch.Tensor,
                 saved: Optional[dict]) -> Chain:
    """The config's chain, or the one saved with the latents (never rebuilt from a step count)."""
    if saved is None:
        return Chain.build(schedule, s["timesteps"], s["skip"], s["eta"])
    chain = Chain.from_dict(saved["chain"])
    chain.check_schedule(schedule)
    if args.timesteps is not None or args.skip is not None or args.eta is not None:
        raise ValueError("--latents regenerates with the chain saved in the file; drop --timesteps, "
                         "--skip and --eta (other values would not reproduce the images)")
    return chain


def solve_summary(stats, T: int, tol: float) -> str:
    """How the solve ended, in words. At call T of the triangular chain every row is exact by
    construction; the last residual then measures the final update, so it is not compared with tol."""
    if stats.exact_by_depth:
        return (f"exact after T = {T} iterations (triangular chain; last update's residual "
                f"{stats.final_residual:.2e})")
    if stats.converged:
        return f"converged after {stats.iterations} iterations, residual {stats.final_residual:.2e} < tol {tol:g}"
    return (f"NOT converged: residual {stats.final_residual:.2e} >= tol {tol:g} after "
            f"{stats.iterations} iterations")


def main(argv: Optional[list[str]] = None) -> dict:
    args, cfg = parse(build_parser(), argv, FLAGS, task="sample")
    s = cfg["sampling"]
    device, dtype, autocast = placement(cfg["trainer"])
    # --trainer.strategy ddp_time: a data x time mesh (None: one process), joined as every job
    # joins it (torchrun / srun, or --trainer.devices N started here).
    mesh = process_mesh(prepare_launch(cfg), device)
    if args.interpolate:
        return interpolate_main(args, cfg, device, dtype, mesh)
    saved = read_latents(args.latents, args.num_images) if args.latents else None
    model, schedule, ckpt_path = build_noise_model(cfg)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise NonFiniteError(f"the checkpoint {ckpt_path} holds NaN/Inf weights ({bad}): it comes from "
                             f"a diverged run; use an earlier checkpoint")
    chain = chosen_chain(args, s, schedule, saved)
    options = options_from(s["solver"], s)
    # Checked before any compute: missing metric weights or reference data, an unusable --out.
    count = s["num_images"] if saved is None else len(saved["x_T"])
    if args.metrics and count < 2:
        raise ValueError(f"--metrics compares distributions and needs at least 2 images; got {count} "
                         f"(raise --num-images)")
    quality = (DatasetMetrics.from_config(args.metrics, cfg, model, args.ref_data, args.fid_weights)
               if args.metrics else None)
    out = check_output_dir(s["out"])
    model = model.to(device=device, dtype=dtype)

    if saved is None:
        shape = (s["num_images"], model.in_channels, model.resolution, model.resolution)
        x_T, noise = draw_noise(shape, chain.T, chain.eta, torch.Generator().manual_seed(s["seed"]))
    else:
        x_T, noise = saved["x_T"], saved.get("noise")
        if chain.eta > 0 and noise is None:
            raise ValueError(f"{args.latents} was found with eta = {chain.eta} but holds no noise")
    x_T = x_T.to(device=device, dtype=dtype)
    noise = None if noise is None else noise.to(device=device, dtype=dtype)
    all_x_T, all_noise = x_T, noise
    if mesh is not None:   # this replica's images, drawn from the one seed: results independent of the world
        mine = mesh.data_slice(x_T.shape[0])
        x_T, noise = x_T[mine], None if noise is None else noise[:, mine]

    bar = tqdm(total=min(s["max_iter"], chain.T) if s["solver"] != "sequential" else chain.T,
               desc=f"{s['solver']} T={chain.T}", unit="it",
               disable=args.no_progress or (mesh is not None and mesh.rank != 0))

    def on_iteration(n, stats, fx):
        bar.update(1)
        if stats.exact_by_depth:     # call T of the triangular chain: the residual is no error
            bar.set_postfix_str(f"exact after T = {chain.T} iterations")
        elif stats.rel_trace:
            bar.set_postfix(residual=f"{stats.last_rel():.2e}")

    start = time.perf_counter()
    with torch.no_grad(), autocast:
        x0, stats = generate(model, x_T, chain, s["solver"], noise=noise, max_batch=s["max_batch"],
                             reducer=None if mesh is None else mesh.time_reducer(),
                             callback=on_iteration, **options)
    seconds = time.perf_counter() - start
    bar.close()
    if mesh is not None:   # rank 0 writes everything (stats: its replica's solve)
        x0, x_T, noise = gather_over_data(mesh, x0), all_x_T, all_noise
        if mesh.rank != 0:
            return {}
    x0 = x0.float().cpu()
    if not bool(torch.isfinite(x0).all()):
        raise NonFiniteError("the samples hold NaN/Inf: the model's outputs are not finite for these "
                             "inputs (check the checkpoint; try --trainer.precision 32-true)")

    nrow = max(1, int(math.ceil(math.sqrt(x0.shape[0]))))
    torchvision.utils.save_image((x0.clamp(-1, 1) + 1) / 2, out / "samples.png", nrow=nrow)
    metrics = {
        "solver": s["solver"], "timesteps": chain.T, "timesteps_requested": chain.requested,
        "skip": chain.skip, "eta": chain.eta, "num_images": int(x0.shape[0]), "seed": s["seed"],
        "checkpoint": str(ckpt_path), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "iterations": stats.iterations, "nfe": stats.iterations,
        "network_evals_per_image": stats.network_rows, "converged": stats.converged,
        "final_residual": stats.rel_residual[-1] if stats.rel_residual else 0.0,
        "exact_by_depth": stats.exact_by_depth,
        "residual_trace": stats.rel_residual, "abs_residual_trace": stats.abs_residual,
        "seconds": seconds, "chain": chain.to_dict(),
    }
    if saved is not None and saved.get("reconstructions") is not None:
        metrics["x0_psnr_vs_saved"] = psnr(x0, saved["reconstructions"].float())
    if args.compare:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            x0_seq, _ = generate(model, x_T, chain, "sequential", noise=noise)
        x0_seq = x0_seq.float().cpu()
        metrics["sequential_seconds"] = time.perf_counter() - start
        metrics["x0_rmse_vs_sequential"] = float((x0 - x0_seq).pow(2).mean().sqrt())
        metrics["x0_psnr_vs_sequential"] = psnr(x0, x0_seq)
        torchvision.utils.save_image((x0_seq.clamp(-1, 1) + 1) / 2, out / "samples_sequential.png",
                                     nrow=nrow)
    if quality is not None:
        metrics.update(quality(x0))
        print(format_metrics(metrics))
    torch.save({"x_T": x_T.cpu(), "noise": None if noise is None else noise.cpu(), "x0": x0,
                "chain": chain.to_dict()}, out / "samples.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'samples.png'}, {out / 'samples.pt'} (x_T, noise, x_0, chain) and "
          f"{out / 'metrics.json'}: {solve_summary(stats, chain.T, s['tol'])}, {seconds:.1f} s on {device}")
    if "x0_psnr_vs_saved" in metrics:
        print(f"regenerated images against the reconstructions saved with the latents: PSNR "
              f"{metrics['x0_psnr_vs_saved']:.1f} dB")
    if args.compare:
        print(f"sequential: {metrics['sequential_seconds']:.1f} s, x0 RMSE vs sequential "
              f"{metrics['x0_rmse_vs_sequential']:.2e} (PSNR {metrics['x0_psnr_vs_sequential']:.1f} dB)")
    return metrics


def interpolate_main(args: argparse.Namespace, cfg: dict, device, dtype, mesh) -> dict:
    """sample.py --interpolate: strips between pairs of saved latents (commands/interpolate.py)."""
    from deqlit.commands.interpolate import fine_tuned_weights, run_interpolation
    if args.latents:
        raise ValueError("--interpolate reads its own latents: drop --latents")
    if mesh is not None:
        raise ValueError("--interpolate runs in one process: drop --trainer.strategy ddp_time / --trainer.devices")
    saved = read_latents(args.interpolate)
    weights = fine_tuned_weights(args.interpolate)
    if weights is not None and args.ckpt is None:     # a joint run: its latents fit its own weights
        cfg["checkpoint"]["path"] = str(weights)
    model, _, ckpt_path = build_noise_model(cfg)
    out = check_output_dir(cfg["sampling"]["out"])
    model = model.to(device=device, dtype=dtype).eval()
    s = cfg["sampling"]
    with torch.no_grad():
        report = run_interpolation(model, cfg, saved, args.pairs, args.frames, args.interp, out,
                                   solver=s["solver"], options=options_from(s["solver"], s), seed=s["seed"])
    report["checkpoint"] = str(ckpt_path)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    mid = report.get("midpoints", {})
    ratio = (f"; midpoints' fd-random {mid['ratio_to_fresh']:.2f}x fresh samples', "
             f"{mid['ratio_to_fresh_midpoints']:.2f}x white-noise latents' midpoints") if "ratio_to_fresh" in mid else ""
    inner = report.get("interpolated", {})
    white = (f"; interpolated latents: lag-1 autocorrelation <= {inner['lag1_autocorrelation_max']:.3f}, "
             f"Shapiro-Wilk rejection rate {inner['shapiro_rejection_rate']:.2f}") if inner else ""
    strips = ", ".join(f"strip_{i}_{j}.png" for i, j in (pair["rows"] for pair in report["pairs"]))
    print(f"wrote {strips} and metrics.json into {out} ({args.interp}, {args.frames} frames, weights "
          f"{ckpt_path}){ratio}{white}")
    return report

