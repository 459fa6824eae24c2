"""How good is the shipped faces model? Figures for deqlit/assets/MODEL_CARD.md.

    python bench/model_quality.py [--ckpt PATH] [--num-samples 32] [--timesteps 50]   # ~2 min, 1 thread
    python bench/model_quality.py --num-samples 4 --timesteps 10 --out DIR            # a check, seconds

Prints and writes bench/results/model_quality.json and bench/results/model_samples.png (or into --out):
- held-out denoising loss (16 never-trained faces) of the model and of the same network at its
  random init;
- KID (fixed random conv features, deqlit.evaluation) of DDIM samples against the training faces,
  next to the KID of the held-out faces (a floor), of flat grey images and of Gaussian noise;
- the range of the samples (before clamping to [-1, 1]).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deqlit.diffusion.chain import Chain
from deqlit.config import load_config
from deqlit.data.faces import load_faces
from deqlit.diffusion.schedule import timestep_sequence
from deqlit.diffusion.sequential import ddim_sample
from deqlit.evaluation import denoising_loss, kid
from deqlit.models.build import build_noise_model
from deqlit.models.unet import DDIMUNet
from deqlit.pictures import numbered_grid, save_picture

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--timesteps", type=int, default=50)
    p.add_argument("--out", default=str(RESULTS), help="folder of the JSON and the PNG (default bench/results)")
    args = p.parse_args()
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "faces.yaml")
    model, abar, path = build_noise_model(cfg, args.ckpt)
    train, held_out = load_faces("train"), load_faces("test")
    torch.manual_seed(0)
    random_init = DDIMUNet(**cfg["model"]).eval()

    figures = {"checkpoint": str(path)}
    figures["heldout_denoise_mse"] = denoising_loss(model, held_out, abar)
    figures["train_denoise_mse"] = denoising_loss(model, train, abar)
    figures["random_init_heldout_denoise_mse"] = denoising_loss(random_init, held_out, abar)

    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.num_samples, 1, 32, 32, generator=gen)
    start = time.perf_counter()
    with torch.no_grad():
        samples = ddim_sample(model, x_T, Chain.from_sequence(abar, timestep_sequence(args.timesteps)))
    figures["sampling_seconds"] = time.perf_counter() - start
    figures["sample_min"], figures["sample_max"] = float(samples.min()), float(samples.max())
    samples = samples.clamp(-1, 1)
    figures["kid_samples_vs_train"] = kid(train, samples)
    figures["kid_heldout_faces_vs_train"] = kid(train, held_out)
    figures["kid_flat_grey_vs_train"] = kid(train, torch.zeros_like(samples))
    figures["kid_noise_vs_train"] = kid(train, torch.randn(samples.shape, generator=gen).clamp(-1, 1))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.num_samples} DDIM samples (T = {args.timesteps}, x_T seed 0) of {path.name}\n"
             f"KID to the training faces {figures['kid_samples_vs_train']:.4f} "
             f"(held-out faces {figures['kid_heldout_faces_vs_train']:.4f})")
    save_picture(numbered_grid(samples, title, columns=8), out / "model_samples.png")
    (out / "model_quality.json").write_text(json.dumps(figures, indent=2))
    for key, value in figures.items():
        print(f"{key:34s} {value}")


if __name__ == "__main__":
    main()
