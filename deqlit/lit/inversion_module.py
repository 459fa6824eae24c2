"""Batch model inversion as a LightningModule (paper Algorithms 1 and 2).

For every image x_0 of a dataset, find the latent x_T (and, with eta > 0, optionally the injected
noise) whose DDIM chain regenerates it. Images are processed batch by batch; each batch gets its
own latents and its own Adam state and is optimized for `max_steps` steps, stopping early once
every image's loss is below `early_stop_loss`.

Methods:
- deq (Algorithm 2): solve X* = h(X*; x_T) without gradient, warm-started from the previous step,
  then one damped step X = (1 - tau) X* + tau h(X*; x_T) with gradient; loss on row 0 (x_0).
  Memory does not grow with T.
- baseline (Algorithm 1): backpropagate through the sequential T-step chain (optionally with
  gradient checkpointing per step).

The whole inversion state (latents, best latents, loss history, cursor, Adam state, warm start) is
saved to `state.pt` every `save_every` steps, so `--resume` continues exactly where it stopped.
One Lightning "training step" is one optimization step of the current batch.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import lightning as L
import torch
import torch.utils.checkpoint
from torch import nn
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from deqlit.deq.layer import DEQSampler
from deqlit.deq.warm_start import shifted_warm_start
from deqlit.diffusion.schedule import chain_alphas, ddim_sigmas, timestep_sequence
from deqlit.diffusion.sequential import ddim_encode, ddim_sample, ddim_step

METHODS = ("deq", "baseline")
INITS = ("random", "ddim-inversion")


def frobenius_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The paper's loss: squared Frobenius norm per image in [-1, 1] scale, (B, ...) -> (B,)."""
    return (x0_hat - x0).pow(2).flatten(1).sum(1)


def sequential_chain_with_grad(model: nn.Module, x_T: torch.Tensor, abar: torch.Tensor,
                               seq: list[int], eta: float, noise: Optional[torch.Tensor],
                               checkpoint: bool) -> torch.Tensor:
    """x_0 of the sequential chain with autograd through every step (the baseline's cost)."""
    chain = chain_alphas(abar, seq)
    sigmas = ddim_sigmas(chain, eta)
    x = x_T
    for i in range(len(seq), 0, -1):
        t = torch.full((x.shape[0],), seq[i - 1], device=x.device, dtype=torch.long)
        eps = torch.utils.checkpoint.checkpoint(model, x, t, use_reentrant=False) if checkpoint else model(x, t)
        x = ddim_step(x, eps, float(chain[i]), float(chain[i - 1]), float(sigmas[i - 1]),
                      None if noise is None else noise[i - 1])
    return x


class InversionModule(L.LightningModule):
    """Inverts `targets` (N, C, H, W) in [-1, 1] with a frozen noise network.

    Buffers (all saved in state.pt): latents (N, C, H, W) current x_T; best_latents and
    best_recon at each image's minimum loss; initial_recon; loss_history (N, max_steps) with NaN
    for steps not taken; min_loss, final_loss, seconds (N,); cursor = [batch index, step].
    """

    def __init__(self, model: nn.Module, abar: torch.Tensor, targets: torch.Tensor, *,
                 method: str = "deq", timesteps: int = 10, skip: str = "uniform", eta: float = 0.0,
                 lr: float = 0.005, max_steps: int = 100, batch_size: int = 16,
                 early_stop_loss: float = 0.0, init: str = "random", seed: int = 0,
                 tau: float = 0.1, warm_start: bool = True, solver: str = "anderson",
                 solver_options: Optional[dict[str, Any]] = None, optimize_noise: bool = False,
                 grad_checkpointing: bool = False, max_batch: Optional[int] = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; use one of {INITS}")
        check_image_size(model, targets)
        self.automatic_optimization = False
        self.model = model.eval().requires_grad_(False)
        self.seq = timestep_sequence(timesteps, len(abar), skip)
        self.T = len(self.seq)
        self.settings = dict(method=method, timesteps=self.T, skip=skip, eta=eta, lr=lr,
                             max_steps=max_steps, batch_size=batch_size, init=init, seed=seed,
                             early_stop_loss=early_stop_loss, tau=tau, warm_start=warm_start,
                             solver=solver, optimize_noise=optimize_noise)
        self.method, self.eta, self.lr, self.max_steps = method, eta, lr, max_steps
        self.batch_size, self.early_stop_loss, self.init, self.seed = batch_size, early_stop_loss, init, seed
        self.warm_start, self.optimize_noise = warm_start, optimize_noise
        self.grad_checkpointing = grad_checkpointing
        self.register_buffer("abar", abar.to(torch.float64), persistent=False)
        self.deq = DEQSampler(self.model, abar, self.seq, eta, solver, solver_options or {},
                              grad="onestep", tau=tau, max_batch=max_batch)
        n = targets.shape[0]
        self.register_buffer("targets", targets.clone())
        self.register_buffer("latents", torch.zeros_like(targets))
        self.register_buffer("noise", torch.zeros((self.T,) + tuple(targets.shape)) if eta > 0 else torch.zeros(0))
        self.register_buffer("best_latents", torch.zeros_like(targets))
        self.register_buffer("best_noise", torch.zeros_like(self.noise))
        self.register_buffer("best_recon", torch.zeros_like(targets))
        self.register_buffer("initial_recon", torch.zeros_like(targets))
        self.register_buffer("loss_history", torch.full((n, max_steps), math.nan))
        self.register_buffer("iterations_history", torch.zeros((n, max_steps)))
        self.register_buffer("min_loss", torch.full((n,), math.inf))
        self.register_buffer("final_loss", torch.full((n,), math.inf))
        self.register_buffer("exact_loss", torch.full((n,), math.inf))
        self.register_buffer("seconds", torch.zeros(n))
        self.register_buffer("cursor", torch.zeros(2, dtype=torch.long))   # [batch, step]
        self.optimizer: Optional[torch.optim.Adam] = None
        self.warm: Optional[torch.Tensor] = None       # last solution X (T, B, C, H, W)
        self.warm_x_T: Optional[torch.Tensor] = None   # the x_T it was solved for (B, C, H, W)
        self.chain_abar = chain_alphas(self.abar, self.seq)
        self.data_var = float(targets.var())           # s^2 of the warm start's Gaussian model
        self._pending_optimizer_state: Optional[dict] = None

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        return math.ceil(self.targets.shape[0] / self.batch_size)

    def total_steps(self) -> int:
        return self.num_batches * self.max_steps

    def steps_done(self) -> int:
        return int(self.cursor[0]) * self.max_steps + int(self.cursor[1])

    def batch_rows(self, b: int) -> slice:
        return slice(b * self.batch_size, min((b + 1) * self.batch_size, self.targets.shape[0]))

    def draw_latents(self, rows: slice) -> None:
        """Per-image generators: image k's start does not depend on batch size or interruptions."""
        for k in range(rows.start, rows.stop):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            self.latents[k] = torch.randn(self.targets.shape[1:], generator=gen).to(self.latents)
            if self.eta > 0:
                self.noise[:, k] = torch.randn((self.T,) + tuple(self.targets.shape[1:]), generator=gen).to(self.noise)
        if self.init == "ddim-inversion":
            with torch.no_grad():
                self.latents[rows] = ddim_encode(self.model, self.targets[rows], self.abar, self.seq)

    def start_batch(self, b: int) -> None:
        rows = self.batch_rows(b)
        self.draw_latents(rows)
        self.best_latents[rows] = self.latents[rows]
        if self.eta > 0:
            self.best_noise[:, rows] = self.noise[:, rows]
        self.warm = None
        with torch.no_grad():
            self.initial_recon[rows] = self.reconstruct(self.latents[rows], self.batch_noise(rows))

    def batch_noise(self, rows: slice) -> Optional[torch.Tensor]:
        return self.noise[:, rows] if self.eta > 0 else None

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Adam:
        opt = torch.optim.Adam(params, lr=self.lr)
        if self._pending_optimizer_state is not None:
            opt.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        return opt

    # ---- the forward models ---------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x_T: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """x_0 of the exact chain from x_T (the sequential sampler, our oracle)."""
        return ddim_sample(self.model, x_T, self.abar, self.seq, eta=self.eta, noise=noise)

    def predict_x0(self, x_T: torch.Tensor, noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """x_0 with a graph back to x_T (and noise); returns (x_0, solver iterations)."""
        if self.method == "baseline":
            x0 = sequential_chain_with_grad(self.model, x_T, self.abar, self.seq, self.eta, noise,
                                            self.grad_checkpointing)
            return x0, self.T
        # Warm start: the previous solution moved along the Gaussian-data flow map to the new x_T
        # (deq/warm_start.py). Reused unmoved it starts as far off in residual as a cold start.
        init = None
        if self.warm_start and self.warm is not None:
            init = shifted_warm_start(self.warm, self.warm_x_T, x_T.detach(), self.chain_abar, self.data_var)
        X, stats = self.deq(x_T, noise, init=init)
        self.warm, self.warm_x_T = X.detach(), x_T.detach().clone()
        self.last_residual = stats.final_residual
        return X[0], stats.iterations

    def configure_optimizers(self) -> None:
        """Each image batch gets its own Adam (made in training_step), so Lightning holds none."""
        return None

    # ---- one optimization step ------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        b, step = int(self.cursor[0]), int(self.cursor[1])
        if b >= self.num_batches:
            return
        rows = self.batch_rows(b)
        if step == 0 and self._pending_optimizer_state is None:
            self.start_batch(b)
        started = time.perf_counter()
        if self.optimizer is None:
            # New batch, or resumed mid-batch: the leaves start from the saved buffers.
            self.params = [self.latents[rows].clone().requires_grad_(True)]
            if self.eta > 0 and self.optimize_noise:
                self.params.append(self.noise[:, rows].clone().requires_grad_(True))
            self.optimizer = self.make_optimizer(self.params)
        x_T = self.params[0]
        noise = self.params[1] if len(self.params) > 1 else self.batch_noise(rows)

        with torch.enable_grad():
            x0_hat, iterations = self.predict_x0(x_T, noise)
            per_image = frobenius_loss(x0_hat, self.targets[rows])
            active = per_image.detach() >= self.early_stop_loss if step > 0 else torch.ones_like(per_image, dtype=torch.bool)
            self.optimizer.zero_grad(set_to_none=True)
            (per_image * active).sum().backward()
        # x_0 above belongs to the latents before this update: record it, then step.
        self.record(rows, step, per_image.detach(), x0_hat.detach(), x_T.detach(),
                    None if noise is None else noise.detach(), iterations)
        if active.any():
            before = x_T.detach().clone()
            self.optimizer.step()
            with torch.no_grad():  # Adam's momentum would still move the images that stopped
                x_T[~active] = before[~active]
        self.latents[rows] = x_T.detach()
        if len(self.params) > 1:
            self.noise[:, rows] = noise.detach()
        self.seconds[rows] += time.perf_counter() - started
        self.log("loss", per_image.mean(), prog_bar=True, logger=False)
        self.log_scalars(b, step, per_image.detach(), iterations)

        finished = step + 1 >= self.max_steps or bool((per_image.detach() < self.early_stop_loss).all())
        if finished:
            self.final_loss[rows] = per_image.detach()
            self.finish_batch(rows)
            self.cursor[0], self.cursor[1] = b + 1, 0
            self.optimizer = None
        else:
            self.cursor[1] = step + 1

    @torch.no_grad()
    def finish_batch(self, rows: slice) -> None:
        """Replace each image's best reconstruction by the exact sequential chain from its best
        latents: the DEQ's x_0 is only as exact as the solver's tolerance, and the saved latents
        must regenerate what the metrics describe (sample.py runs the exact chain)."""
        noise = self.best_noise[:, rows] if self.eta > 0 else None
        self.best_recon[rows] = self.reconstruct(self.best_latents[rows], noise)
        self.exact_loss[rows] = frobenius_loss(self.best_recon[rows], self.targets[rows])

    def record(self, rows: slice, step: int, per_image: torch.Tensor, x0_hat: torch.Tensor,
               x_T: torch.Tensor, noise: Optional[torch.Tensor], iterations: int) -> None:
        self.loss_history[rows, step] = per_image
        self.iterations_history[rows, step] = iterations
        better = per_image < self.min_loss[rows]
        idx = torch.arange(rows.start, rows.stop, device=per_image.device)[better]
        self.min_loss[idx] = per_image[better]
        self.best_latents[idx] = x_T[better]
        self.best_recon[idx] = x0_hat[better]
        if noise is not None:
            self.best_noise[:, idx] = noise[:, better]

    def log_scalars(self, b: int, step: int, per_image: torch.Tensor, iterations: int) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_scalar"):
            return
        global_step = b * self.max_steps + step
        experiment.add_scalar(f"{self.method}/loss_mean", float(per_image.mean()), global_step)
        experiment.add_scalar(f"{self.method}/batch{b}/loss_vs_step", float(per_image.mean()), step)
        if self.method == "deq":
            experiment.add_scalar("deq/solver_iterations", iterations, global_step)
            experiment.add_scalar("deq/solver_residual", float(self.last_residual), global_step)

    # ---- results --------------------------------------------------------------------------
    def image_metrics(self) -> dict[str, Any]:
        """Per image: min and final loss during the optimization; the exact chain's loss, MSE, PSNR
        and SSIM from the best latents (the images that sample.py regenerates); seconds."""
        done = torch.isfinite(self.min_loss)
        recon = self.best_recon.clamp(-1, 1)
        per_image = []
        for k in range(self.targets.shape[0]):
            if not bool(done[k]):
                continue
            target, rec = self.targets[k:k + 1], recon[k:k + 1]
            per_image.append({
                "index": k, "min_loss": float(self.min_loss[k]),
                "final_loss": float(self.final_loss[k]) if math.isfinite(float(self.final_loss[k])) else None,
                "exact_loss": float(self.exact_loss[k]) if math.isfinite(float(self.exact_loss[k])) else None,
                "mse": float(mean_squared_error(rec, target)),
                "psnr": float(peak_signal_noise_ratio(rec, target, data_range=2.0)),
                "ssim": float(structural_similarity_index_measure(rec, target, data_range=2.0)),
                "seconds": float(self.seconds[k]),
                "steps": int(torch.isfinite(self.loss_history[k]).sum()),
            })
        means = {}
        for key in ("min_loss", "final_loss", "exact_loss", "mse", "psnr", "ssim", "seconds"):
            values = [m[key] for m in per_image if m[key] is not None]
            means[f"mean_{key}"] = sum(values) / len(values) if values else None
        return {"settings": self.settings, "images": per_image, **means}

    # ---- resume ---------------------------------------------------------------------------
    def inversion_state(self) -> dict[str, Any]:
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                 if not k.startswith("model.") and not k.startswith("deq.")}
        state["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
        state["warm"] = self.warm.cpu() if self.warm is not None else None
        state["warm_x_T"] = self.warm_x_T.cpu() if self.warm_x_T is not None else None
        state["settings"] = dict(self.settings)
        return state

    def load_inversion_state(self, state: dict[str, Any]) -> None:
        saved = state.get("settings", {})
        for key in ("method", "timesteps", "skip", "eta", "max_steps", "batch_size", "init", "seed"):
            if key in saved and saved[key] != self.settings[key]:
                raise ValueError(f"cannot resume: the saved run used {key}={saved[key]!r}, this one "
                                 f"{key}={self.settings[key]!r}; use the same settings or a new --out")
        buffers = {k: v for k, v in state.items() if k not in ("optimizer", "warm", "warm_x_T", "settings")}
        if buffers["targets"].shape != self.targets.shape or not torch.allclose(buffers["targets"], self.targets):
            raise ValueError("cannot resume: the saved run inverted other images; use a new --out")
        for key, value in buffers.items():
            getattr(self, key).copy_(value)
        self._pending_optimizer_state = state.get("optimizer")
        self.warm, self.warm_x_T = state.get("warm"), state.get("warm_x_T")
        if self.warm is not None and self.warm_x_T is None:    # a state.pt from before the shift
            self.warm = None


def check_image_size(model: nn.Module, targets: torch.Tensor) -> None:
    res, ch = getattr(model, "resolution", None), getattr(model, "in_channels", None)
    if targets.dim() != 4:
        raise ValueError(f"targets must be (N, C, H, W), got shape {tuple(targets.shape)}")
    if res is not None and (targets.shape[-1] != res or targets.shape[-2] != res):
        raise ValueError(f"the images are {targets.shape[-2]}x{targets.shape[-1]} but the model takes "
                         f"{res}x{res}: set data.resolution to {res} (the loader resizes) or use a "
                         f"model trained at {targets.shape[-2]}x{targets.shape[-1]}")
    if ch is not None and targets.shape[1] != ch:
        raise ValueError(f"the images have {targets.shape[1]} channels but the model takes {ch}: "
                         f"set data.channels to {ch}")
