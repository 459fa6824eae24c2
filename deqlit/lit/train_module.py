"""LightningModule that trains a DDPM noise network with the epsilon-prediction loss."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from deqlit.diffusion.schedule import alphas_cumprod, make_betas
from deqlit.lit.datamodule import data_share
from deqlit.lit.ema import make_ema, update_ema as ema_step
from deqlit.guards import NonFiniteError
from deqlit.models.unet import DDIMUNet


def batch_generator(seed: int, step: int, batch_idx: int = 0, rank: int = 0) -> torch.Generator:
    """The CPU generator of one training batch: a function of (run seed, optimizer step, batch
    index, data rank) only, so a resumed run draws what an uninterrupted one would (a checkpoint
    holds no RNG state, and every start seeds the process-wide RNGs again). batch_idx separates the
    micro-batches of one step (accumulate_grad_batches); rank, the processes of one DDP step.
    SeedSequence mixes the four, so nearby keys give unrelated streams."""
    key = np.random.SeedSequence([seed, step, batch_idx, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Within the block the process-wide RNGs (CPU and `device`'s) start from a seed drawn from
    `generator`, and are put back on leaving: nn.Dropout has no generator argument, so this is how
    its masks become a function of the batch's key too. Reading and setting a CUDA generator's
    state are host-side (seed and offset): no device sync."""
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    backend = getattr(torch, device.type, None)    # torch.cuda, torch.mps, ...; 'meta' has none
    forked = [device] if device.type != "cpu" and hasattr(backend, "get_rng_state") else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
        torch.manual_seed(seed)
        yield


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh CPU tensor x on `device`, without the host waiting for the device: a CUDA copy
    from pinned memory is asynchronous (PyTorch's pinned-memory cache keeps the block until the
    copy is done), one from pageable memory may wait for the stream's earlier work."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class DiffusionTrainModule(L.LightningModule):
    """Trains `DDIMUNet(**model)` on images in [-1, 1]; keeps an EMA copy in `self.ema`.

    Logs train/loss every step, val/denoise_mse (held-out images, fixed noise and timesteps, EMA
    weights) every epoch, and a grid of samples from the EMA model every `sample_every` steps.
    Gradient clipping is the Trainer's (gradient_clip_val, from the config's train.grad_clip).

    Device and dtype: every tensor made here follows the batch (x0) or the model, so the module
    runs on any accelerator and precision (tests/test_train_config.py runs it on 'meta' tensors,
    where any CPU constant would raise, and in float64).

    Randomness: every draw comes from a CPU torch.Generator, then moves to the device: a training
    batch's from batch_generator(seed, step, batch_idx, rank), so that --resume continues the
    run exactly (tests/test_train_resume_rng.py); validation and sample noise from fixed seeds.
    """

    def __init__(self, model: dict[str, Any], diffusion: dict[str, Any], lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 200,
                 ema_decay: float = 0.999, hflip: bool = True, sample_every: int = 1000,
                 sample_count: int = 16, sample_timesteps: int = 50,
                 sample_solver: str = "newton-scan",
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = DDIMUNet(**model)
        self.ema = make_ema(self.model)
        betas = make_betas(diffusion.get("beta_schedule", "linear"),
                           diffusion.get("num_diffusion_timesteps", 1000),
                           diffusion.get("beta_start", 1e-4), diffusion.get("beta_end", 0.02))
        self.register_buffer("abar", alphas_cumprod(betas), persistent=False)
        self.last_loss = float("nan")   # the last step's loss on the host, for the progress bar

    # ---- the loss -------------------------------------------------------------------------
    def diffusion_loss(self, net: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 (DDPM Eq. 14)."""
        a = self.abar[t].to(x0.dtype)[:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(net(x_t, t), noise)

    def training_loss(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
        """The loss of one batch x0 (B, C, H, W). Its draws, in this order from `generator` (a CPU
        one; default: this step's first batch, rank 0): flips (B,), timesteps (B,), noise like x0
        (in x0's dtype), the dropout seed; they move to x0's device with to_device (no host wait)."""
        if generator is None:
            generator = batch_generator(self.hparams.seed, self.global_step)
        batch = x0.shape[0]
        if self.hparams.hflip:
            flip = to_device(torch.rand(batch, generator=generator) < 0.5, x0.device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = to_device(torch.randint(0, len(self.abar), (batch,), generator=generator), x0.device)
        noise = to_device(torch.randn(x0.shape, generator=generator, dtype=x0.dtype), x0.device)
        with seeded_global_rng(generator, x0.device):
            return self.diffusion_loss(self.model, x0, t, noise)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x0,) = batch
        rank, _ = data_share(self._trainer)
        loss = self.training_loss(x0, batch_generator(self.hparams.seed, self.global_step, batch_idx, rank))
        # Before backward and the optimizer step, so that NaN never reaches the weights or the EMA
        # (the one scalar host sync per step). Raising makes Lightning stop with nothing saved.
        value = loss.detach().item()
        if not math.isfinite(value):
            raise NonFiniteError(f"training diverged at step {self.global_step + 1}: "
                                 f"the loss is {value}")
        # The progress bar shows this float (run_training.LossBar): a prog_bar=True tensor would be
        # read back after the optimizer step, a second sync per step. Loggers get the tensor.
        self.last_loss = value
        self.log("train/loss", loss)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (the checkpoint) run before that hook,
        # and a checkpoint must hold the EMA of every step it holds the weights of.
        self.update_ema()

    def update_ema(self) -> None:
        """One EMA step towards self.model (lit/ema.py: warm-up decay, no host reads)."""
        ema_step(self.ema, self.model, self.hparams.ema_decay)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if self.hparams.sample_every and step % self.hparams.sample_every == 0:
            self.log_samples()

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        (x0,) = batch
        # Fixed noise and timesteps so that the curve compares like with like across epochs.
        gen = torch.Generator().manual_seed(1234 + batch_idx)
        losses = []
        for t_value in (50, 250, 500, 750, 950):
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.full((x0.shape[0],), t_value, device=x0.device, dtype=torch.long)
            losses.append(self.diffusion_loss(self.ema.module, x0, t, noise))
        self.log("val/denoise_mse", torch.stack(losses).mean(), prog_bar=True)

    # ---- samples --------------------------------------------------------------------------
    @torch.no_grad()
    def log_samples(self) -> None:
        from deqlit.diffusion.chain import Chain
        from deqlit.sampling import generate

        net = self.ema.module
        was_training = net.training
        net.eval()
        gen = torch.Generator().manual_seed(self.hparams.seed)
        shape = (self.hparams.sample_count, net.in_channels, net.resolution, net.resolution)
        # The network's device and dtype (float64 under --trainer.precision 64-true).
        weight = next(net.parameters())
        x_T = torch.randn(shape, generator=gen).to(device=weight.device, dtype=weight.dtype)
        chain = Chain.build(self.abar, self.hparams.sample_timesteps)
        images, _ = generate(net, x_T, chain, solver=self.hparams.sample_solver)
        net.train(was_training)
        # One copy to the host per grid (every sample_every steps), as the logger needs it there.
        grid = torchvision.utils.make_grid((images.float().cpu().clamp(-1, 1) + 1) / 2, nrow=4)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a plain DDIMUNet state_dict."""
        return {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
