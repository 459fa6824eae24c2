"""Builds the Trainer for train.py from a resolved config."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from deqlit.config import save_config
from deqlit.lit.datamodule import ImageDataModule
from deqlit.lit.train_module import DiffusionTrainModule

TRAIN_MODULE_KEYS = ("lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "hflip",
                     "sample_every", "sample_count", "sample_timesteps", "sample_solver", "seed")


class ExportEMA(Callback):
    """Writes the EMA weights as a plain state_dict (RUN/ema.pt) whenever a checkpoint is saved."""

    def __init__(self, path: Path):
        self.path = path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            torch.save(pl_module.ema_state_dict(), self.path)


def run_training(cfg: dict, resume: str | None = None, fast_dev_run: bool = False) -> DiffusionTrainModule:
    train = cfg["train"]
    out = Path(train.get("out", "runs/train"))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    L.seed_everything(train.get("seed", 0), workers=True)

    data = ImageDataModule(name=cfg["data"]["name"], resolution=cfg["data"]["resolution"],
                           channels=cfg["data"]["channels"], batch_size=cfg["data"]["batch_size"],
                           root=cfg["data"].get("root", "data"),
                           steps_per_epoch=train.get("steps_per_epoch", 250))
    module = DiffusionTrainModule(model=cfg["model"], diffusion=cfg["diffusion"],
                                  **{k: train[k] for k in TRAIN_MODULE_KEYS if k in train})
    if train.get("init"):
        from deqlit.models.loading import load_weights
        load_weights(module.model, train["init"], ema=True)
        module.ema.module.load_state_dict(module.model.state_dict())

    ckpt_dir = out / "checkpoints"
    # `last.ckpt` every N steps so that an interrupted run loses little; no metric needed for it.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1,
                                 filename="step-{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=train.get("checkpoint_every", 250))
    trainer = L.Trainer(max_steps=train.get("max_steps", 10000), accelerator="auto", devices=1,
                        logger=TensorBoardLogger(str(out), name="tb", version=0),
                        callbacks=[checkpoint, ExportEMA(out / "ema.pt")],
                        log_every_n_steps=train.get("log_every_n_steps", 10),
                        fast_dev_run=fast_dev_run,
                        num_sanity_val_steps=0, enable_progress_bar=True)
    ckpt_path = None
    if resume:
        ckpt_path = str(ckpt_dir / "last.ckpt") if resume == "last" else resume
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"cannot resume: {ckpt_path} does not exist (no earlier run "
                                    f"wrote checkpoints to {ckpt_dir}); run without --resume")
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module
