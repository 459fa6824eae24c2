"""The callbacks that save a training run (train.py and joint fine-tuning) and its progress bar.

ExportEMA writes RUN/ema.pt beside every checkpoint and refuses non-finite weights; SaveLast saves
last.ckpt at the end and on Ctrl-C / SIGTERM; LossBar shows the last step's loss.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deqlit.guards import NonFiniteError, atomic_torch_save, first_nonfinite


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

    `written_step` is the step of the last save known to be complete: ExportEMA.saved_step is set
    when a save starts, so a signal that lands inside ModelCheckpoint's save (e.g. the first one,
    at step checkpoint_every) leaves it ahead of the files; that save is done again here.
    """

    def __init__(self, path: Path, export: ExportEMA):
        self.path = path
        self.export = export
        self.saved_step: int | None = None
        self.written_step: int | None = None

    def _save(self, trainer, done: int | None) -> None:
        if trainer.fast_dev_run or trainer.global_step in (0, done):
            return  # nothing trained, or this step is saved already
        trainer.save_checkpoint(self.path, weights_only=False)   # the full state, for --resume
        self.saved_step = self.written_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.written_step = self.export.saved_step   # a save begun before this batch has finished

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, self.export.saved_step)
        if self.export.saved_step == trainer.global_step:   # ModelCheckpoint's, finished by now
            self.written_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            unready_next_batch(trainer)
            with contextlib.suppress(NonFiniteError):
                self._save(trainer, self.written_step)

    def interrupted(self, step: int, resumed_from: str | None, max_steps: int | None = None) -> tuple[str, bool]:
        """(what an interrupted run kept, whether --resume can continue it), from the files:
        never a --resume for a checkpoint that is not there, nor for a run whose every step (of
        `max_steps`) is done: the signal came as the last step ended, and a resume would be refused."""
        if self.written_step is not None and self.path.is_file():
            if self.written_step == step and max_steps is not None and 0 < max_steps <= step:
                return (f"saved {self.path} at step {step}: all {max_steps} steps were done, so the run "
                        f"is complete (--resume with more steps trains on)"), False
            if self.written_step == step:
                return f"saved {self.path} at step {step}", True
            return (f"the last checkpoint is {self.path}, step {self.written_step} (nothing newer "
                    f"was saved)"), True
        if resumed_from and Path(resumed_from).is_file():
            return f"the last checkpoint is {resumed_from} (nothing newer was saved)", True
        return "no step had finished, so nothing was saved; run the same command again", False


def unready_next_batch(trainer) -> None:
    """Undo Lightning's count of the batch an interrupt stopped before it started.

    The interrupt is raised in on_train_batch_start (runs.guards.StopAtStepBoundary), after the
    loop has counted that batch 'ready' but not 'started'. Saved so, the progress matches none of
    the restart points Lightning knows, and on --resume it adds one to the step that the loggers
    use: every later TensorBoard point sat one step to the right of the uninterrupted run's. With
    the count undone, the checkpoint reads as saved after the last finished batch, which it is."""
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    for counter in (getattr(progress, "total", None), getattr(progress, "current", None)):
        if counter is not None and counter.ready == counter.started + 1:
            counter.ready -= 1


class LossBar(TQDMProgressBar):
    """The progress bar with the last step's loss, read from the host float of the NaN check:
    a prog_bar=True tensor would be read back after the optimizer step, a second sync per step."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "last_loss", float("nan"))
        if math.isfinite(loss):
            metrics["loss"] = round(loss, 4)
        return metrics
