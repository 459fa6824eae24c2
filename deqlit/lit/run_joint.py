"""Builds and runs joint fine-tuning (`train.py --task joint`) from a resolved config.

The run folder gets: ema.pt (the fine-tuned EMA weights, a plain state_dict that load_weights,
sample.py --ckpt and invert.py --ckpt read), latents.pt ({'x_T', 'indices', 'chain'}), metrics.json,
config.yaml, TensorBoard curves under tb/, and checkpoints/last.ckpt for --resume.
"""
from __future__ import annotations

import json
import math
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics.functional.image import peak_signal_noise_ratio

from deqlit.config import save_config
from deqlit.deq.solvers import options_from
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.sequential import ddim_sample
from deqlit.lit.guards import (RunInterrupted, UserInputError, atomic_torch_save, check_output_dir,
                               interrupts_as_exceptions, refuse_existing_run)
from deqlit.lit.joint_module import JointFineTuneModule, kurtosis, lag1_autocorrelation, typicality_chi2
from deqlit.lit.joint_sharding import JointTimeSharding, distribution
from deqlit.lit.run_inversion import launched_worker
from deqlit.lit.run_training import ExportEMA, SaveLast, resume_checkpoint
from deqlit.lit.trainer import build_trainer
from deqlit.parallel.launch import on_rank_zero

MODULE_KEYS = ("timesteps", "skip", "grad", "tau", "solver", "adjoint", "max_batch", "latent_lr",
               "network_lr", "weight_decay", "warmup_steps", "lr_decay", "lr_final", "grad_clip",
               "ema_decay", "prior_weight", "typicality_weight", "sphere", "init", "seed",
               "compare_every", "image_every", "kid_every", "kid_samples")
RUN_MARKERS = ("checkpoints", "ema.pt", "latents.pt")


# ---- data ------------------------------------------------------------------------------------
class IndexedImages(Dataset):
    """(index, image) pairs of an image tensor (N, C, H, W): the index names the image's latent."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.images[i]


class EpochSampler(Sampler[int]):
    """A permutation (or `draws` draws with replacement) seeded by (seed, epoch): the Trainer calls
    set_epoch, so a resumed run sees the same order as an uninterrupted one. A run resumed in the
    middle of an epoch gets a fresh iterator, so the sampler skips the batches that the restored
    global step says were done (`progress()`; one training step per batch)."""

    def __init__(self, size: int, seed: int, draws: Optional[int] = None, per_batch: int = 1,
                 steps_per_epoch: int = 1, progress: Optional[Callable[[], int]] = None):
        self.size, self.seed, self.draws, self.epoch = size, seed, draws, 0
        self.per_batch, self.steps_per_epoch, self.progress = per_batch, steps_per_epoch, progress

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size if self.draws is None else self.draws

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.draws is None:
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = torch.randint(0, self.size, (self.draws,), generator=gen).tolist()
        done = 0 if self.progress is None else self.progress() - self.epoch * self.steps_per_epoch
        return iter(order[max(0, done) * self.per_batch:])


class JointDataModule(L.LightningDataModule):
    """{'target': (index, image) batches of the fine-tuning set, 'prior': image batches of the
    original training data}; one epoch = one pass over the targets."""

    def __init__(self, targets: torch.Tensor, prior: torch.Tensor, batch_size: int,
                 prior_batch_size: int, seed: int = 0):
        super().__init__()
        self.targets, self.prior = targets, prior
        self.batch_size, self.prior_batch_size, self.seed = min(batch_size, len(targets)), prior_batch_size, seed

    def train_dataloader(self) -> CombinedLoader:
        steps = math.ceil(len(self.targets) / self.batch_size)

        def progress() -> int:
            return 0 if self.trainer is None else self.trainer.global_step
        target = DataLoader(IndexedImages(self.targets), batch_size=self.batch_size,
                            sampler=EpochSampler(len(self.targets), self.seed, None, self.batch_size,
                                                 steps, progress))
        prior = DataLoader(self.prior, batch_size=self.prior_batch_size,
                           sampler=EpochSampler(len(self.prior), self.seed + 1, steps * self.prior_batch_size,
                                                self.prior_batch_size, steps, progress))
        return CombinedLoader({"target": target, "prior": prior}, mode="max_size_cycle")

    def prior_images(self, limit: int = 256) -> torch.Tensor:
        return self.prior[:limit]


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, x_T: torch.Tensor, targets: torch.Tensor, chain: Chain,
             prior: torch.Tensor, abar: torch.Tensor) -> dict[str, Any]:
    """Exact (sequential DDIM) reconstructions of `targets` from x_T with `model`, the latents'
    statistics and the denoising MSE on the prior (training) images and on the targets."""
    from deqlit.evaluation import denoising_loss
    model = model.eval()
    x0 = ddim_sample(model, x_T, chain)
    per_image = (x0 - targets).pow(2).flatten(1).sum(1)
    psnr = [float(peak_signal_noise_ratio(a.clamp(-1, 1), b, data_range=2.0)) for a, b in zip(x0, targets)]
    along_w, along_h = lag1_autocorrelation(x_T)
    rho, kurt = (along_w + along_h) / 2, kurtosis(x_T)
    return {"recon_loss_mean": float(per_image.mean()), "psnr_mean": sum(psnr) / len(psnr),
            "psnr_min": min(psnr), "psnr": psnr, "autocorr": rho.tolist(), "autocorr_max": float(rho.abs().max()),
            "kurtosis": kurt.tolist(), "kurtosis_maxdev": float((kurt - 3).abs().max()),
            "typicality_chi2_mean": float(typicality_chi2(x_T).mean()),
            "denoise_mse_train": denoising_loss(model, prior, abar),
            "denoise_mse_targets": denoising_loss(model, targets, abar)}


class ProcessTimeBudget(Callback):
    """Stops training once this process has used `seconds` of CPU time (time.process_time) since
    fit started: a budget that other programs on a shared machine do not eat into (benchmarks)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = float(seconds), None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.process_time()
        # lr_decay anneals over the budget, whatever the step count it will allow
        pl_module.progress_clock = lambda: (time.process_time() - self.start) / max(self.seconds, 1e-9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.process_time() - self.start >= self.seconds:
            trainer.should_stop = True


class SaveLatents(Callback):
    """Writes RUN/latents.pt next to ema.pt whenever a checkpoint is saved (rank 0)."""

    def __init__(self, path: Path):
        self.path = path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            atomic_torch_save(pl_module.latents_payload(), self.path)


# ---- the run ---------------------------------------------------------------------------------
def joint_settings(cfg: dict) -> dict[str, Any]:
    joint = dict(cfg.get("joint") or {})
    if not joint:
        raise UserInputError("the config has no 'joint' section: add one (see configs/faces.yaml) "
                             "or pass --config with a file that has it")
    for key in ("max_steps", "batch_size", "timesteps"):
        value = joint.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"--joint.{key} must be a positive integer, got {value!r}")
    return joint


def build_joint(cfg: dict, ckpt: Optional[str] = None) -> tuple[JointFineTuneModule, JointDataModule, torch.Tensor]:
    """(module, datamodule, the fine-tuning images) from the config; the network from `ckpt`,
    joint.ckpt or checkpoint.path."""
    from deqlit.data.registry import load_images
    from deqlit.models.build import build_noise_model
    joint, data = joint_settings(cfg), cfg["data"]
    model, abar, _ = build_noise_model(cfg, ckpt or joint.get("ckpt"))
    targets = load_images(data["name"], joint.get("split", "test"), data["resolution"], data["channels"],
                          data.get("root", "data"), limit=joint.get("num_images"))
    prior = load_images(data["name"], joint.get("prior_split", "train"), data["resolution"],
                        data["channels"], data.get("root", "data"))
    solver = joint.get("solver", "triangular-anderson")
    options = {} if solver == "sequential" else options_from(solver, joint)
    module = JointFineTuneModule(model, abar, len(targets), tuple(targets.shape[1:]), solver_options=options,
                                 **{k: joint[k] for k in MODULE_KEYS if k in joint})
    datamodule = JointDataModule(targets, prior, joint.get("batch_size", 16),
                                 joint.get("prior_batch_size", 16), joint.get("seed", 0))
    return module, datamodule, targets


def run_joint(cfg: dict, resume: Optional[str] = None, fast_dev_run: bool = False,
              ckpt: Optional[str] = None) -> JointFineTuneModule:
    joint = joint_settings(cfg)
    out = Path(joint.get("out", "runs/joint"))
    ckpt_dir = out / "checkpoints"
    ckpt_path = resume_checkpoint(resume, ckpt_dir) if resume else None
    # --trainer.strategy ddp_time: torchrun / srun's world is joined first, then rank 0 alone
    # checks and writes the folder (deqlit/lit/joint_sharding.py); else section is {}.
    launched, section = distribution(cfg)

    def check_folder() -> None:
        if not resume:
            refuse_existing_run(out, RUN_MARKERS)
        check_output_dir(out)
        save_config(cfg, out / "config.yaml")
    on_rank_zero(check_folder, launched_worker(), launched)
    L.seed_everything(joint.get("seed", 0), workers=True)
    module, datamodule, targets = build_joint(cfg, ckpt)
    from deqlit.evaluation import denoising_loss
    before = {"denoise_mse_train": denoising_loss(module.model, datamodule.prior, module.abar)}

    export = ExportEMA(out / "ema.pt")
    saver = SaveLast(ckpt_dir / "last.ckpt", export)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1, filename="step-{step}",
                                 auto_insert_metric_name=False, enable_version_counter=False,
                                 every_n_train_steps=joint.get("checkpoint_every", 50))
    max_time = joint.get("max_time_s")   # a wall-time budget (benchmarks); None = steps only
    cpu_budget = joint.get("max_process_s")   # a CPU-time budget of this process (benchmarks)
    extra = [] if cpu_budget is None else [ProcessTimeBudget(cpu_budget)]
    trainer = build_trainer(section, cfg.get("parallel"), max_steps=joint.get("max_steps", 200),
                        max_time=None if max_time is None else timedelta(seconds=float(max_time)),
                        accelerator=joint.get("accelerator", "auto"),
                        devices=joint.get("devices", 1), logger=TensorBoardLogger(str(out), name="tb", version=0),
                        callbacks=[checkpoint, export, SaveLatents(out / "latents.pt"), saver, *extra,
                                   *([JointTimeSharding()] if section else [])],
                        use_distributed_sampler=False,    # ddp_time: every process loads the global batch
                        log_every_n_steps=joint.get("log_every_n_steps", 1), fast_dev_run=fast_dev_run,
                        num_sanity_val_steps=0, enable_progress_bar=joint.get("progress_bar", True),
                        enable_model_summary=False)
    start, cpu_start = time.time(), time.process_time()
    try:
        with interrupts_as_exceptions():
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except SIGTERMException:
                raise RunInterrupted(signal.SIGTERM) from None
    except RunInterrupted as err:
        if export.saved_step is None and not ckpt_path:
            raise RunInterrupted(err.signum, "no step had finished, so nothing was saved; run the "
                                 "same command again", resumable=False) from None
        raise RunInterrupted(err.signum, f"the last checkpoint is {ckpt_dir / 'last.ckpt'}") from None
    if fast_dev_run or not trainer.is_global_zero:
        return module
    write_metrics(module, datamodule, targets, out, time.time() - start, before,
                  process_seconds=time.process_time() - cpu_start)
    return module


def write_metrics(module: JointFineTuneModule, datamodule: JointDataModule, targets: torch.Tensor,
                  out: Path, seconds: float, before: dict[str, float],
                  process_seconds: Optional[float] = None) -> dict[str, Any]:
    payload = module.latents_payload()
    x_T, idx = payload["x_T"], payload["indices"]
    device_targets = targets[idx].to(x_T)
    metrics = {"steps": module.global_step, "seconds": round(seconds, 1),
               "process_seconds": None if process_seconds is None else round(process_seconds, 1),
               "num_images": len(idx),
               "chain": payload["chain"], "grad": module.hparams.grad,
               "ema": evaluate(module.ema.module.cpu(), x_T, device_targets, module.chain,
                               datamodule.prior, module.abar.cpu()),
               "raw": evaluate(module.model.cpu(), x_T, device_targets, module.chain,
                               datamodule.prior, module.abar.cpu()),
               "start_denoise_mse_train": before.get("denoise_mse_train")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
