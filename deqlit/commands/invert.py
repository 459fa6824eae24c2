"""invert.py's command line: flags for the common settings, dotted overrides for everything."""
from __future__ import annotations

import argparse
from typing import Optional

from deqlit.cli import parse
from deqlit.lit.run_inversion import run_inversion

FLAGS = {"method": "inversion.method", "timesteps": "inversion.timesteps", "skip": "inversion.skip",
         "eta": "inversion.eta", "num_images": "inversion.num_images",
         "batch_size": "inversion.batch_size", "lr": "inversion.lr",
         "max_steps": "inversion.max_steps", "init": "inversion.init", "seed": "inversion.seed",
         "out": "inversion.out", "ckpt": "checkpoint.path", "split": "inversion.split"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Invert images with DEQ-DDIM (or the sequential "
                                "baseline). Any config key can be overridden as --section.key value.")
    p.add_argument("--method", choices=["deq", "baseline"])
    p.add_argument("--timesteps", type=int, help="T")
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--eta", type=float)
    p.add_argument("--num-images", type=int, dest="num_images")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-steps", type=int, dest="max_steps", help="optimization steps per image")
    p.add_argument("--init", choices=["random", "ddim-inversion"])
    p.add_argument("--split", help="which split of the dataset to invert (default: test)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ckpt", help="noise-network weights (default: checkpoint.path of the config)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args, cfg = parse(build_parser(), argv, FLAGS)
    module, out = run_inversion(cfg, resume=args.resume, progress=not args.no_progress)
    metrics = module.image_metrics()
    print(f"\ninverted {len(metrics['images'])} images with {module.method} (T = {module.T}): "
          f"mean loss {metrics['mean_exact_loss']:.3f} (exact chain from the saved latents; "
          f"min during the optimization {metrics['mean_min_loss']:.3f}), mean PSNR {metrics['mean_psnr']:.2f} dB, "
          f"mean SSIM {metrics['mean_ssim']:.3f}")
    print(f"results in {out}/: grid.png (target | initial | final), loss_curve.png, metrics.json, "
          f"latents.pt (python sample.py --latents {out}/latents.pt)")
    print(f"view the curves: tensorboard --logdir {out}/tb")
    return metrics
