"""invert.py's command line: flags for the common settings, dotted overrides for everything."""
from __future__ import annotations

import argparse
from typing import Optional

from deqlit.cli import parse, positive_int
from deqlit.deq.inversion import INIT_ALIASES, INITS, METHODS
from deqlit.runs.inversion import run_inversion

FLAGS = {"method": "inversion.method", "timesteps": "inversion.timesteps", "skip": "inversion.skip",
         "eta": "inversion.eta", "num_images": "inversion.num_images",
         "batch_size": "inversion.batch_size", "lr": "inversion.lr",
         "max_steps": "inversion.max_steps", "init": "inversion.init", "seed": "inversion.seed",
         "out": "inversion.out", "ckpt": "checkpoint.path", "split": "inversion.split",
         "solver": "inversion.solver", "max_batch": "inversion.max_batch"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Invert images with DEQ-DDIM (or the sequential "
                                "baseline). Any config key can be overridden as --section.key value, "
                                "Trainer arguments as --trainer.KEY (e.g. --trainer.accelerator gpu).")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--timesteps", type=positive_int, help="T")
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--eta", type=float)
    p.add_argument("--num-images", type=positive_int, dest="num_images")
    p.add_argument("--batch-size", type=positive_int, dest="batch_size")
    p.add_argument("--max-batch", type=positive_int, dest="max_batch", help="rows per network call")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-steps", type=positive_int, dest="max_steps", help="optimization steps per image")
    p.add_argument("--init", choices=[*INITS, *INIT_ALIASES],
                   help="the start of the latents (random: the old name of gaussian)")
    p.add_argument("--solver", choices=["picard", "anderson", "triangular-anderson"])
    p.add_argument("--split", help="which split of the dataset to invert (default: test)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ckpt", help="noise-network weights (default: checkpoint.path of the config)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args, cfg = parse(build_parser(), argv, FLAGS)
    metrics, out = run_inversion(cfg, resume=args.resume, progress=not args.no_progress)
    if not metrics:          # a process other than rank 0 of a multi-process run
        return metrics
    method = metrics["settings"].get("method")
    print(f"\ninverted {metrics['num_images']} images with {method} "
          f"(init {metrics['settings'].get('init')}, T = {len(metrics['chain'].get('timesteps', []))}): "
          f"mean loss {metrics['mean_exact_loss']:.4g} (exact chain from the saved latents), "
          f"mean PSNR {metrics['mean_psnr']:.2f} dB (start {metrics['mean_initial_psnr']:.2f} dB), "
          f"mean SSIM {metrics['mean_ssim']:.3f}; latents: lag-1 autocorrelation "
          f"{metrics['mean_latent_autocorrelation']:.2f}, kurtosis {metrics['mean_latent_kurtosis']:.2f} "
          f"(white noise: 0 and 3)")
    merged = (out / "latents.pt").is_file()
    print(f"results in {out}/: metrics.json, latents/part-*.pt"
          + (f", grid.png (target | initial | final | latent x_T, PSNR under each image), curves.png "
             f"({'the exact solve: residual per state and iteration, PSNR against network evaluations' if method == 'exact' else 'loss against optimization step'}), "
             f"latents.pt (python sample.py --latents {out}/latents.pt)" if merged else ""))
    print(f"view the curves: tensorboard --logdir {out}/tb")
    return metrics
