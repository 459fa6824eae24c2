"""Builds the Trainer for train.py from a resolved config, and guards the run.

Guards: the output folder is checked (writable, not an earlier run unless --resume) and a resume
checkpoint opened before any compute; a non-finite loss stops the run (train_module), and no
checkpoint or ema.pt is ever written from non-finite weights; Ctrl-C and SIGTERM save last.ckpt
and leave as RunInterrupted, which train.py's entry point prints with the --resume command.
"""
from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deqlit.config import save_config
from deqlit.lit.datamodule import ImageDataModule
from deqlit.lit.metrics_callback import metrics_callbacks
from deqlit.lit.guards import (DiskFullError, NonFiniteError, RunInterrupted, UserInputError,
                               atomic_torch_save, check_checkpoint_readable, check_output_dir,
                               find_enospc, first_nonfinite, interrupts_as_exceptions,
                               refuse_existing_run)
from deqlit.lit.train_module import DiffusionTrainModule

TRAIN_MODULE_KEYS = ("lr", "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "hflip",
                     "sample_every", "sample_count", "sample_timesteps", "sample_solver", "seed")
RUN_MARKERS = ("checkpoints", "ema.pt")  # what an earlier run leaves that a new one would overwrite


class ExportEMA(Callback):
    """Writes the EMA weights as a plain state_dict (RUN/ema.pt) whenever a checkpoint is saved.

    First checks every weight of the checkpoint (raw, EMA): on_save_checkpoint runs before the
    checkpoint file is written, so raising here keeps both last.ckpt and ema.pt from NaN weights.
    """

    def __init__(self, path: Path):
        self.path = path
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        bad = first_nonfinite(checkpoint["state_dict"])
        if bad is not None:
            raise NonFiniteError(f"training diverged by step {trainer.global_step}: the weight "
                                 f"{bad} is NaN or infinite, so no checkpoint was written")
        if trainer.is_global_zero:
            atomic_torch_save(pl_module.ema_state_dict(), self.path)
        self.saved_step = trainer.global_step


class SaveLast(Callback):
    """Saves last.ckpt (and, through ExportEMA, ema.pt) at the end of training and on Ctrl-C/SIGTERM.

    ModelCheckpoint saves every `checkpoint_every` steps and, at the end, only if it saved nothing
    before: the steps after the last multiple would be lost, and so would the steps before an
    interrupt. Its save_on_exception would also save on a diverged run; this saves only on
    interrupts, and ExportEMA's check still refuses non-finite weights.
    """

    def __init__(self, path: Path, export: ExportEMA):
        self.path = path
        self.export = export
        self.saved_step: int | None = None

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.global_step in (0, self.export.saved_step):
            return  # nothing trained, or this step is saved already
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            with contextlib.suppress(NonFiniteError):
                self._save(trainer)


def check_train_values(cfg: dict) -> None:
    """Refuse values that would fail late or silently (a zero step count trains nothing)."""
    train, data = cfg["train"], cfg["data"]
    for key, value in (("train.max_steps", train.get("max_steps", 10000)),
                       ("train.checkpoint_every", train.get("checkpoint_every", 250)),
                       ("train.steps_per_epoch", train.get("steps_per_epoch", 250)),
                       ("data.batch_size", data.get("batch_size"))):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"--{key} must be a positive integer, got {value!r}")
    lr = train.get("lr", 1e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserInputError(f"--train.lr (--lr) must be a positive number, got {lr!r}")


def resume_checkpoint(resume: str, ckpt_dir: Path) -> str:
    """The checkpoint file --resume names, checked to exist and to open."""
    path = ckpt_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (no earlier run "
                                f"wrote checkpoints to {ckpt_dir}); run without --resume")
    others = sorted(p for p in ckpt_dir.glob("step-*.ckpt") if p != path)
    earlier = f", or resume from an earlier checkpoint with --resume {others[-1]}" if others else ""
    check_checkpoint_readable(path, f"run without --resume and with --out NEW_FOLDER{earlier}")
    return str(path)


def run_training(cfg: dict, resume: str | None = None, fast_dev_run: bool = False) -> DiffusionTrainModule:
    train = cfg["train"]
    out = Path(train.get("out", "runs/train"))
    ckpt_dir = out / "checkpoints"
    check_train_values(cfg)
    ckpt_path = resume_checkpoint(resume, ckpt_dir) if resume else None
    if not resume:
        refuse_existing_run(out, RUN_MARKERS)
    check_output_dir(out)
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

    # `last.ckpt` every N steps so that an interrupted run loses little; no metric needed for it.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1,
                                 filename="step-{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=train.get("checkpoint_every", 250),
                                 enable_version_counter=False)
    export = ExportEMA(out / "ema.pt")
    saver = SaveLast(ckpt_dir / "last.ckpt", export)
    trainer = L.Trainer(max_steps=train.get("max_steps", 10000), accelerator="auto", devices=1,
                        precision=train.get("precision", "32-true"),
                        logger=TensorBoardLogger(str(out), name="tb", version=0),
                        callbacks=[checkpoint, export, saver, *metrics_callbacks(cfg)],
                        log_every_n_steps=train.get("log_every_n_steps", 10),
                        fast_dev_run=fast_dev_run,
                        num_sanity_val_steps=0, enable_progress_bar=True)
    try:
        with interrupts_as_exceptions():
            try:
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
            except SIGTERMException:  # Lightning's own SIGTERM path (outside the main thread)
                raise RunInterrupted(signal.SIGTERM) from None
    except RunInterrupted as err:
        if export.saved_step is not None and export.saved_step == trainer.global_step:
            detail = f"saved {saver.path} at step {export.saved_step}"  # now or by the last period
        elif export.saved_step is not None or ckpt_path:
            detail = f"the last checkpoint is {ckpt_dir / 'last.ckpt'} (nothing newer was saved)"
        else:
            raise RunInterrupted(err.signum, "no step had finished, so nothing was saved; run the "
                                 "same command again", resumable=False) from None
        raise RunInterrupted(err.signum, detail) from None
    except NonFiniteError as err:
        raise NonFiniteError(f"{err}. {_kept(export, ckpt_dir, ckpt_path)} "
                             f"{_remedies(train)}") from None
    except Exception as err:
        if find_enospc(err) is not None and not isinstance(err, DiskFullError):
            raise DiskFullError(out) from err
        raise
    return module


def _kept(export: ExportEMA, ckpt_dir: Path, resumed_from: str | None) -> str:
    last = ckpt_dir / "last.ckpt"
    if export.saved_step is not None:
        return f"The last finite checkpoint, {last} (step {export.saved_step}), and ema.pt were kept."
    if resumed_from and last.is_file():
        return f"The checkpoint this run resumed from, {resumed_from}, was kept."
    return "No checkpoint had been written yet."


def _remedies(train: dict[str, Any]) -> str:
    text = (f"Lower the learning rate (--lr, now {train.get('lr', 1e-3):g}) or clip gradients harder "
            f"(--train.grad_clip, now {train.get('grad_clip', 1.0)})")
    precision = str(train.get("precision", "32-true"))
    if not precision.startswith("32"):
        text += f", or train in 32-bit precision (--train.precision 32-true, now {precision})"
    return text + "."
