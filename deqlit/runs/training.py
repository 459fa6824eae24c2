"""Builds the Trainer for train.py from a resolved config, and guards the run.

The Trainer comes from the config's `trainer:` section (deqlit.runs.trainer.build_trainer; any
Trainer argument, overridable as --trainer.KEY VALUE), plus what `train:` owns: max_steps,
log_every_n_steps (null: follows max_steps, see log_every) and grad_clip (the Trainer's
gradient_clip_val, by norm).

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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from deqlit.config import save_config
from deqlit.guards import DiskFullError, NonFiniteError, RunInterrupted, UserInputError, find_enospc
from deqlit.lit.checkpoints import ExportEMA, LossBar, SaveLast
from deqlit.lit.datamodule import ImageDataModule
from deqlit.lit.metrics_callback import metrics_callbacks
from deqlit.lit.train_module import DiffusionTrainModule
from deqlit.runs.folder_lock import folder_lock
from deqlit.runs.guards import (RUN_FILES, FolderStart, check_output_dir, interrupts_as_exceptions,
                                refuse_existing_run)
from deqlit.runs.launch import launched_worker, on_rank_zero_of, prepare_launch
from deqlit.runs.resume import check_resume, record_resume, resume_checkpoint
from deqlit.runs.sections import module_arguments, resolve
from deqlit.runs.trainer import build_trainer, saving

# Trainer arguments that train.py takes from `train:` (their home in every config and in the
# saved run): the trainer section may not set them too, or one of the two would be ignored.
TRAIN_OWNED = {"max_steps": "--max-steps (train.max_steps)", "gradient_clip_val": "--train.grad_clip",
               "gradient_clip_algorithm": "--train.grad_clip (train.py clips by norm)"}


def log_every(train: dict[str, Any]) -> int:
    """train.log_every_n_steps, or when it is null one that follows the run's length: every 10
    steps for long runs, fewer for short ones so that even a 3-step run logs a curve of 3 points."""
    if train["log_every_n_steps"] is not None:
        return int(train["log_every_n_steps"])
    return min(10, max(1, int(train["max_steps"]) // 10))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train_values(cfg: dict) -> None:
    """Refuse values that would fail late or silently (a zero step count trains nothing), and a
    trainer section Lightning would refuse, before anything is written."""
    train, data = cfg["train"], cfg["data"]
    for key in ("train.max_steps", "train.checkpoint_every", "train.steps_per_epoch",
                "train.log_every_n_steps", "train.sample_timesteps", "train.sample_count",
                "train.val_images", "data.batch_size"):
        section, name = key.split(".")
        value = cfg[section][name] if key != "train.val_images" else (train["val_images"] or 1)
        if key == "train.log_every_n_steps" and value is None:   # null: follows max_steps
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"--{key} must be a positive integer, got {value!r}")
    for key in ("warmup_steps", "sample_every", "seed"):
        value = train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserInputError(f"--train.{key} must be an integer >= 0, got {value!r}")
    if not _number(train["lr"]) or train["lr"] <= 0:
        raise UserInputError(f"--train.lr (--lr) must be a positive number, got {train['lr']!r}")
    checks = (("weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
              ("grad_clip", lambda v: v is None or (_number(v) and v >= 0),
               "a number >= 0 (0 or null: no clipping)"),
              ("ema_decay", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"))
    for key, ok, want in checks:
        if not ok(train[key]):
            raise UserInputError(f"--train.{key} must be {want}, got {train[key]!r}")
    owned = sorted(set(cfg["trainer"]) & set(TRAIN_OWNED))
    if owned:
        raise UserInputError("train.py sets " + "; ".join(f"trainer.{k} from {TRAIN_OWNED[k]}" for k in owned)
                             + ": remove it from the trainer section")


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
    start: FolderStart               # what the run creates before its first checkpoint


def prepare_training(cfg: dict, resume: str | None = None,
                     fast_dev_run: bool = False) -> TrainingJob:
    """Check every value, the output folder, the resume checkpoint and settings, and the data;
    build the module and the Trainer. Writes nothing but the (empty) output folder, created once
    everything else has passed."""
    cfg = resolve(cfg, "train")
    train, data_cfg = cfg["train"], cfg["data"]
    out = Path(train["out"])
    ckpt_dir = out / "checkpoints"
    check_train_values(cfg)
    launch = prepare_launch(cfg)
    ckpt_path = resume_checkpoint(resume, ckpt_dir) if resume else None
    record = check_resume(cfg, out, ckpt_path, "train") if ckpt_path else None
    if not resume and not fast_dev_run:     # rank 0 reads the folder (Lightning's workers start once it has written)
        on_rank_zero_of(launch, lambda: refuse_existing_run(out, RUN_FILES))
    L.seed_everything(train["seed"], workers=True)

    data = ImageDataModule(name=data_cfg["name"], resolution=data_cfg["resolution"],
                           channels=data_cfg["channels"], batch_size=data_cfg["batch_size"],
                           root=data_cfg["root"], steps_per_epoch=train["steps_per_epoch"],
                           num_workers=data_cfg["num_workers"], val_images=train["val_images"],
                           seed=train["seed"])
    data.setup("fit")   # lists the files and decodes one image: a wrong dataset fails here
    module = DiffusionTrainModule(model=cfg["model"], diffusion=cfg["diffusion"],
                                  **module_arguments(train, DiffusionTrainModule, ("model", "diffusion")))
    if train["init"]:
        from deqlit.models.loading import load_weights
        load_weights(module.model, train["init"], ema=True)
        module.ema.module.load_state_dict(module.model.state_dict())

    # `last.ckpt` every N steps so that an interrupted run loses little; no metric needed for it.
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1,
                                 filename="step-{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=train["checkpoint_every"],
                                 enable_version_counter=False)
    export = ExportEMA(out / "ema.pt")
    saver = SaveLast(ckpt_dir / "last.ckpt", export)
    # train.log_every_n_steps is train.py's: it wins over the section's (the other commands').
    launch.section.pop("log_every_n_steps", None)
    bar = [LossBar()] if launch.section.get("enable_progress_bar", True) else []
    clip = train["grad_clip"] or None
    trainer = build_trainer(
        launch, max_steps=train["max_steps"], log_every_n_steps=log_every(train),
        gradient_clip_val=clip, gradient_clip_algorithm="norm" if clip else None,
        logger=TensorBoardLogger(str(out), name="tb", version=0, default_hp_metric=False),
        **saving(fast_dev_run, [checkpoint, export, saver], [*bar, *metrics_callbacks(cfg)]),
        fast_dev_run=fast_dev_run, num_sanity_val_steps=0)
    # Created last: data, model, weights and Trainer settings that fail leave no folder behind.
    start = FolderStart(out, results="checkpoints/*.ckpt")     # before the folder is made
    if not fast_dev_run:                # a debug step writes nothing (Lightning logs and saves nothing)
        check_output_dir(out)
    return TrainingJob(cfg, out, module, data, trainer, export, saver, ckpt_path, record, start)


def run_training(cfg: dict, resume: str | None = None, fast_dev_run: bool = False) -> DiffusionTrainModule:
    """Train as the config says: prepare_training, write config.yaml (a resume leaves the run's
    config.yaml as it is and appends to resumes.yaml), then Trainer.fit with the guards."""
    job = prepare_training(cfg, resume, fast_dev_run)
    cfg = job.cfg
    out, trainer, export, saver, ckpt_path = job.out, job.trainer, job.export, job.saver, job.ckpt_path
    ckpt_dir = out / "checkpoints"
    # One writer: a DDP worker re-runs this script (Lightning's launcher) or is rank > 0 (torchrun).
    # It holds the folder (a second train.py, invert.py or joint run there is refused) and, if the
    # run fails before its first checkpoint, removes what it wrote (config.yaml, tb/): nothing to
    # resume, and the corrected rerun is not refused as an earlier run.
    writer = rank_zero_only.rank == 0 and not launched_worker() and not fast_dev_run
    with job.start.undone_on_failure() if writer else contextlib.nullcontext(), \
            folder_lock(out, "train.py") if writer else contextlib.nullcontext():
        if writer:
            job.start.creates(out / "config.yaml", out / "tb", ckpt_dir)
            if not (out / "config.yaml").is_file() or job.resume_record is None:
                save_config(cfg, out / "config.yaml")
            if job.resume_record is not None:
                record_resume(out, job.resume_record)
        fit(job)
    if trainer.is_global_zero:
        print(summary(cfg, out, trainer.global_step, job.module.last_loss, saver) if not fast_dev_run else
              f"fast-dev-run: {trainer.global_step} training step(s) and the validation ran; nothing was written")
    return job.module


def fit(job: TrainingJob) -> None:
    """Trainer.fit with the guards: an interrupt saves last.ckpt and leaves as RunInterrupted (no
    --resume offered once every step is done), a non-finite loss names what was kept and what to
    change, a full disk names the folder."""
    cfg, out, trainer, export, saver, ckpt_path = job.cfg, job.out, job.trainer, job.export, job.saver, job.ckpt_path
    ckpt_dir = out / "checkpoints"
    try:
        with interrupts_as_exceptions(trainer):
            try:
                trainer.fit(job.module, datamodule=job.data, ckpt_path=ckpt_path,
                            weights_only=True)   # never unpickle code from a checkpoint
            except SIGTERMException:  # Lightning's own SIGTERM path (outside the main thread)
                raise RunInterrupted(signal.SIGTERM) from None
    except RunInterrupted as err:
        raise RunInterrupted(err.signum, *saver.interrupted(trainer.global_step, ckpt_path,
                                                            cfg["train"]["max_steps"])) from None
    except NonFiniteError as err:
        raise NonFiniteError(f"{err}. {_kept(export, ckpt_dir, ckpt_path)} "
                             f"{_remedies(cfg)}") from None
    except Exception as err:
        if find_enospc(err) is not None and not isinstance(err, DiskFullError):
            raise DiskFullError(out) from err
        raise


def summary(cfg: dict[str, Any], out: Path, steps: int, loss: float, saver: SaveLast) -> str:
    """What a finished run prints: what it trained, where its files are, how to see its curves."""
    loss_text = f" (last loss {loss:.4g})" if math.isfinite(loss) else ""
    lines = [f"trained {steps} steps{loss_text}"]
    if saver.written_step is not None and (out / "ema.pt").is_file():
        lines.append(f"wrote {out / 'ema.pt'} (the EMA weights of step {saver.written_step}: --ckpt of "
                     f"sample.py and invert.py) and {out / 'checkpoints' / 'last.ckpt'} (the same "
                     f"command with --resume continues it)")
    every = cfg["train"]["sample_every"]
    samples = (f"; EMA samples every {every} steps are its image 'samples'"
               if every and every <= steps else "")
    lines.append(f"view the curves: tensorboard --logdir {out / 'tb'}{samples}")
    return "\n".join(lines)


def _kept(export: ExportEMA, ckpt_dir: Path, resumed_from: str | None) -> str:
    last = ckpt_dir / "last.ckpt"
    if export.saved_step is not None:
        return f"The last finite checkpoint, {last} (step {export.saved_step}), and ema.pt were kept."
    if resumed_from and last.is_file():
        return f"The checkpoint this run resumed from, {resumed_from}, was kept."
    return "No checkpoint had been written yet."


def _remedies(cfg: dict[str, Any]) -> str:
    train = cfg["train"]
    text = (f"Lower the learning rate (--lr, now {train['lr']:g}) or clip gradients harder "
            f"(--train.grad_clip, now {train['grad_clip']})")
    precision = str(cfg["trainer"].get("precision", "32-true"))   # absent: Lightning's 32-true
    if not precision.startswith(("32", "64")):
        text += f", or train in 32-bit precision (--trainer.precision 32-true, now {precision})"
    return text + "."
