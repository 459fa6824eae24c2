"""Builds the Trainer for train.py from a resolved config, and guards the run.

The Trainer comes from the config's `trainer:` section (deqlit.runs.trainer.build_trainer; any
Trainer argument, overridable as --trainer.KEY VALUE), plus what `train:` owns: max_steps,
log_every_n_steps and grad_clip (the Trainer's gradient_clip_val, by norm).

Guards: the output folder is checked (writable, not an earlier run unless --resume) and a resume
checkpoint opened before any compute; a non-finite loss stops the run (train_module), and no
checkpoint or ema.pt is ever written from non-finite weights; Ctrl-C and SIGTERM save last.ckpt
and leave as RunInterrupted, which train.py's entry point prints with the --resume command.
"""
from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from deqlit.config import save_config
from deqlit.lit.datamodule import ImageDataModule
from deqlit.lit.metrics_callback import metrics_callbacks
from deqlit.guards import (DiskFullError, NonFiniteError, RunInterrupted, UserInputError,
                           atomic_torch_save, check_checkpoint_readable, find_enospc, first_nonfinite)
from deqlit.runs.guards import check_output_dir, interrupts_as_exceptions, refuse_existing_run
from deqlit.lit.train_module import DiffusionTrainModule
from deqlit.runs.resume import check_resume, record_resume
from deqlit.runs.trainer import build_trainer, trainer_kwargs

TRAIN_MODULE_KEYS = ("lr", "weight_decay", "warmup_steps", "ema_decay", "hflip",
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
        trainer.save_checkpoint(self.path, weights_only=False)   # the full state, for --resume
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            with contextlib.suppress(NonFiniteError):
                self._save(trainer)


# Trainer arguments that train.py takes from `train:` (their home in every config and in the
# saved run): the trainer section may not set them too, or one of the two would be ignored.
TRAIN_OWNED = {"max_steps": "--max-steps (train.max_steps)", "gradient_clip_val": "--train.grad_clip",
               "gradient_clip_algorithm": "--train.grad_clip (train.py clips by norm)"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train_values(cfg: dict) -> None:
    """Refuse values that would fail late or silently (a zero step count trains nothing), and a
    trainer section Lightning would refuse, before anything is written."""
    train, data = cfg["train"], cfg["data"]
    for key, value in (("train.max_steps", train.get("max_steps", 10000)),
                       ("train.checkpoint_every", train.get("checkpoint_every", 250)),
                       ("train.steps_per_epoch", train.get("steps_per_epoch", 250)),
                       ("train.log_every_n_steps", train.get("log_every_n_steps", 1)),
                       ("train.sample_timesteps", train.get("sample_timesteps", 50)),
                       ("train.sample_count", train.get("sample_count", 16)),
                       ("train.val_images", train.get("val_images", 1024) or 1),
                       ("data.batch_size", data.get("batch_size"))):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"--{key} must be a positive integer, got {value!r}")
    for key in ("warmup_steps", "sample_every", "seed"):
        value = train.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserInputError(f"--train.{key} must be an integer >= 0, got {value!r}")
    lr = train.get("lr", 1e-3)
    if not _number(lr) or lr <= 0:
        raise UserInputError(f"--train.lr (--lr) must be a positive number, got {lr!r}")
    checks = (("weight_decay", 0.0, lambda v: _number(v) and v >= 0, "a number >= 0"),
              ("grad_clip", 1.0, lambda v: v is None or (_number(v) and v >= 0),
               "a number >= 0 (0 or null: no clipping)"),
              ("ema_decay", 0.999, lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"))
    for key, default, ok, want in checks:
        if not ok(train.get(key, default)):
            raise UserInputError(f"--train.{key} must be {want}, got {train.get(key)!r}")
    if "precision" in train:
        raise UserInputError(f"train.precision is now a Trainer setting: use --trainer.precision "
                             f"{train['precision']} (or `precision:` in the config's trainer section)")
    section = trainer_kwargs(cfg.get("trainer"))   # unknown keys raise, with close matches
    owned = sorted(set(section) & set(TRAIN_OWNED))
    if owned:
        raise UserInputError("train.py sets " + "; ".join(f"trainer.{k} from {TRAIN_OWNED[k]}" for k in owned)
                             + ": remove it from the trainer section")


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


class LossBar(TQDMProgressBar):
    """The progress bar with the last step's loss, read from the host float of the NaN check:
    a prog_bar=True tensor would be read back after the optimizer step, a second sync per step."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_loss", float("nan"))
        if math.isfinite(loss):
            metrics["loss"] = round(loss, 4)
        return metrics


@dataclass
class TrainingJob:
    """Everything a training run needs, built and checked before anything is written."""
    cfg: dict[str, Any]
    out: Path
    module: DiffusionTrainModule
    data: ImageDataModule
    trainer: L.Trainer
    export: ExportEMA
    saver: SaveLast
    ckpt_path: Optional[str]
    resume_record: Optional[dict[str, Any]]


def prepare_training(cfg: dict, resume: str | None = None,
                     fast_dev_run: bool = False) -> TrainingJob:
    """Check every value, the output folder, the resume checkpoint and settings, and the data;
    build the module and the Trainer. Writes nothing but the (empty) output folder."""
    train = cfg["train"]
    out = Path(train.get("out", "runs/train"))
    ckpt_dir = out / "checkpoints"
    check_train_values(cfg)
    ckpt_path = resume_checkpoint(resume, ckpt_dir) if resume else None
    record = check_resume(cfg, out, ckpt_path) if ckpt_path else None
    if not resume:
        refuse_existing_run(out, RUN_MARKERS)
    check_output_dir(out)
    L.seed_everything(train.get("seed", 0), workers=True)

    data = ImageDataModule(name=cfg["data"]["name"], resolution=cfg["data"]["resolution"],
                           channels=cfg["data"]["channels"], batch_size=cfg["data"]["batch_size"],
                           root=cfg["data"].get("root", "data"),
                           steps_per_epoch=train.get("steps_per_epoch", 250),
                           num_workers=cfg["data"].get("num_workers", 0),
                           val_images=train.get("val_images", 1024))
    data.setup("fit")   # lists the files and decodes one image: a wrong dataset fails here
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
    section = dict(cfg.get("trainer") or {})
    # train.log_every_n_steps is train.py's (the trainer section's is the other commands');
    # the section's applies when train: has none.
    from_section = section.pop("log_every_n_steps", None)
    log_every = train.get("log_every_n_steps", from_section if from_section is not None else 10)
    bar = [LossBar()] if section.get("enable_progress_bar", True) else []
    clip = train.get("grad_clip", 1.0) or None
    try:
        trainer = build_trainer(
            section, max_steps=train.get("max_steps", 10000), log_every_n_steps=log_every,
            gradient_clip_val=clip, gradient_clip_algorithm="norm" if clip else None,
            logger=TensorBoardLogger(str(out), name="tb", version=0),
            callbacks=[checkpoint, export, saver, *bar, *metrics_callbacks(cfg)],
            fast_dev_run=fast_dev_run, num_sanity_val_steps=0)
    except MisconfigurationException as err:
        raise UserInputError(f"the trainer settings cannot run here: {err}") from None
    return TrainingJob(cfg, out, module, data, trainer, export, saver, ckpt_path, record)


def run_training(cfg: dict, resume: str | None = None, fast_dev_run: bool = False) -> DiffusionTrainModule:
    """Train as the config says: prepare_training, write config.yaml (a resume leaves the run's
    config.yaml as it is and appends to resumes.yaml), then Trainer.fit with the guards."""
    job = prepare_training(cfg, resume, fast_dev_run)
    out, trainer, export, saver, ckpt_path = job.out, job.trainer, job.export, job.saver, job.ckpt_path
    ckpt_dir = out / "checkpoints"
    if rank_zero_only.rank == 0:   # a DDP worker process re-runs this script: one writer
        if not (out / "config.yaml").is_file() or job.resume_record is None:
            save_config(cfg, out / "config.yaml")
        if job.resume_record is not None:
            record_resume(out, job.resume_record)
    try:
        with interrupts_as_exceptions():
            try:
                trainer.fit(job.module, datamodule=job.data, ckpt_path=ckpt_path,
                            weights_only=True)   # never unpickle code from a checkpoint
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
                             f"{_remedies(cfg)}") from None
    except Exception as err:
        if find_enospc(err) is not None and not isinstance(err, DiskFullError):
            raise DiskFullError(out) from err
        raise
    return job.module


def _kept(export: ExportEMA, ckpt_dir: Path, resumed_from: str | None) -> str:
    last = ckpt_dir / "last.ckpt"
    if export.saved_step is not None:
        return f"The last finite checkpoint, {last} (step {export.saved_step}), and ema.pt were kept."
    if resumed_from and last.is_file():
        return f"The checkpoint this run resumed from, {resumed_from}, was kept."
    return "No checkpoint had been written yet."


def _remedies(cfg: dict[str, Any]) -> str:
    train = cfg["train"]
    text = (f"Lower the learning rate (--lr, now {train.get('lr', 1e-3):g}) or clip gradients harder "
            f"(--train.grad_clip, now {train.get('grad_clip', 1.0)})")
    precision = str((cfg.get("trainer") or {}).get("precision", "32-true"))
    if not precision.startswith(("32", "64")):
        text += f", or train in 32-bit precision (--trainer.precision 32-true, now {precision})"
    return text + "."
