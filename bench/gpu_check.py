"""One short prepared script for a GPU machine: sample, invert and train a few steps on CUDA, compare
each result with the CPU's, print wall times. Runs from the checkout without installing:

    PYTHONPATH=. python bench/gpu_check.py                 # CUDA vs CPU, shipped faces model (< 5 min)
    PYTHONPATH=. python bench/gpu_check.py --device cpu --tiny    # the suite's dry run

Each check runs once on --device and once on the CPU with the same inputs and reports the largest
difference. On a GPU small differences are expected (TF32 is switched off here; cuDNN picks other
convolution algorithms); a device bug (a constant left on the CPU) raises instead.
Writes bench/results/gpu_check.csv.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from bench_csv import write_csv
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deqlit.config import find_config, load_config  # noqa: E402
from deqlit.deq.inverse_map import exact_invert  # noqa: E402
from deqlit.deq.inversion import BatchInverter, InversionSettings  # noqa: E402
from deqlit.diffusion.chain import Chain  # noqa: E402
from deqlit.models.build import build_noise_model  # noqa: E402
from deqlit.sampling import generate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(device: torch.device, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.detach().float().cpu(), time.perf_counter() - start


def setup(tiny: bool):
    """(model, faces (N, 1, 32, 32) or tiny images, T for sampling, T for inversion)."""
    if tiny:
        from deqlit.models.unet import DDIMUNet
        torch.manual_seed(0)
        model = DDIMUNet(ch=8, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                         dropout=0.0, in_channels=1, resolution=8, norm_groups=2).eval()
        from deqlit.diffusion.schedule import alphas_cumprod, linear_betas
        images = torch.rand(2, 1, 8, 8) * 2 - 1
        return model, alphas_cumprod(linear_betas()), images, 5, 4
    cfg = load_config(find_config("faces"))
    model, schedule, _ = build_noise_model(cfg)
    from deqlit.data.registry import load_images
    return model, schedule, load_images("faces", "test", 32, 1, limit=4), 25, 10


def run_checks(device: torch.device, tiny: bool, train_steps: int) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model_cpu, schedule, images, T_sample, T_invert = setup(tiny)
    model_dev = copy.deepcopy(model_cpu).to(device)
    rows = []

    def compare(name: str, make: Callable[[torch.nn.Module, torch.device], torch.Tensor]) -> None:
        ref, cpu_s = timed(torch.device("cpu"), lambda: make(model_cpu, torch.device("cpu")))
        out, dev_s = timed(device, lambda: make(model_dev, device))
        diff = float((out - ref).abs().max())
        rows.append({"check": name, "device": str(device), "max_abs_diff_vs_cpu": diff,
                     "seconds_device": round(dev_s, 3), "seconds_cpu": round(cpu_s, 3)})
        print(f"{name:28s} max |{device.type} - cpu| = {diff:.2e}   {device.type} {dev_s:7.2f} s   "
              f"cpu {cpu_s:7.2f} s", flush=True)

    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn((4,) + tuple(images.shape[1:]), generator=gen)
    sample_chain = Chain.build(schedule, T_sample)

    def sample(solver: str):
        def make(model, dev):
            # the sequential chain is one pass: it takes no iteration budget or tolerance
            options = {} if solver == "sequential" else {"max_iter": T_sample, "tol": 1e-3}
            with torch.no_grad():
                return generate(model, x_T.to(dev), sample_chain, solver, max_batch=64, **options)[0]
        return make
    for solver in ("sequential", "triangular-anderson", "newton-scan"):
        compare(f"sample {solver} T={T_sample}", sample(solver))

    invert_chain = Chain.build(schedule, T_invert)

    def exact(model, dev):
        return exact_invert(model, images.to(dev), invert_chain, mode="all-timesteps", solver="picard",
                            max_iter=10, tol=1e-4, on_fail="return")[0]
    compare(f"exact inversion T={T_invert}", exact)

    def deq_steps(model, dev):
        settings = InversionSettings(method="deq", init="ddim-inversion", lr=0.01, max_steps=3,
                                     solver="triangular-anderson",
                                     solver_options=dict(max_iter=15, tol=1e-2, m=3)).validate()
        inverter = BatchInverter(model, invert_chain, images.to(dev), list(range(len(images))), settings, 64)
        while not inverter.finished:
            inverter.step()
        return inverter.latents
    compare(f"deq inversion 3 steps T={T_invert}", deq_steps)

    def train(model, dev):
        net = copy.deepcopy(model).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        abar = schedule.to(dev)
        losses = []
        for _ in range(train_steps):
            x0 = images.to(dev)
            t = torch.randint(0, len(schedule), (len(x0),), generator=g).to(dev)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            a = abar[t].float()[:, None, None, None]
            loss = torch.nn.functional.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)
    compare(f"train {train_steps} steps (losses)", train)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    p.add_argument("--tiny", action="store_true", help="a tiny random UNet and T (seconds, for tests)")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "gpu_check.csv"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for the dry run")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = run_checks(device, args.tiny, args.train_steps)
    print(f"wrote {write_csv(rows, args.out)}")
    return rows


if __name__ == "__main__":
    main()
