"""The Trainer from a config's `trainer:` section: every Trainer argument can be set there or on
the command line (`--trainer.accelerator gpu --trainer.devices 4 --trainer.precision 16-mixed`)."""
from __future__ import annotations

import inspect
import signal
import threading
from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    from deqlit.runs.launch import Launch

# What each job decides itself; a config value for these would be overridden silently.
JOB_OWNED = {"callbacks", "logger", "default_root_dir", "enable_checkpointing", "inference_mode"}


def trainer_kwargs(section: dict[str, Any] | None) -> dict[str, Any]:
    """Check a `trainer:` section against Trainer's signature; unknown keys raise, naming them."""
    section = dict(section or {})
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(section) - accepted)
    if unknown:
        import difflib
        hints = [f"{k} (did you mean {', '.join(difflib.get_close_matches(k, accepted, 2))}?)"
                 if difflib.get_close_matches(k, accepted, 2) else k for k in unknown]
        raise ValueError(f"unknown trainer option(s): {', '.join(hints)}; the trainer section takes "
                         f"lightning.Trainer's arguments")
    owned = sorted(set(section) & JOB_OWNED)
    if owned:
        raise ValueError(f"trainer option(s) {', '.join(owned)} are set by the command itself; "
                         f"remove them from the trainer section")
    return section


def build_trainer(launch: "Launch", **job: Any) -> L.Trainer:
    """The one Trainer factory: L.Trainer(**what the job sets, **the trainer section). The section
    is taken as it is and wins for every key the job also sets (accelerator, devices, precision,
    max_steps, enable_progress_bar, ...), so a user can always override them; the job alone sets
    JOB_OWNED keys (callbacks, logger, ...). A Trainer that cannot run here (no GPU for
    --trainer.accelerator gpu, a bad precision) raises UserInputError naming Lightning's reason."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from deqlit.devices import precision_note
    from deqlit.guards import UserInputError
    from deqlit.runs.launch import trainer_section
    try:
        trainer = L.Trainer(**{**job, **trainer_kwargs(trainer_section(launch))})
    except (MisconfigurationException, ValueError) as err:
        if isinstance(err, UserInputError):
            raise
        raise UserInputError(f"the trainer settings cannot run here: {err}") from None
    copies_start_deaf_to_ctrl_c(trainer)
    # The precision Lightning resolved (it runs 16-mixed on a CPU as bf16-mixed, and says so).
    note = precision_note(trainer.strategy.root_device.type, trainer.precision)
    if note and trainer.is_global_zero:
        print(note, flush=True)
    return trainer


def note_tolerance(trainer: L.Trainer, tol: Any, flag: str) -> None:
    """Say (rank 0) when a solver's `tol` is below what the precision Lightning resolved can
    resolve (devices.tolerance_note): the solves would then run to their iteration limit."""
    from deqlit.devices import tolerance_note
    note = tolerance_note(str(trainer.precision), tol, flag)
    if note and trainer.is_global_zero:
        print(note, flush=True)


def copies_start_deaf_to_ctrl_c(trainer: L.Trainer) -> None:
    """The processes that Lightning's launcher starts (--trainer.devices N) ignore SIGINT until
    their own handler is installed (runs.guards.interrupts_as_exceptions). A terminal's Ctrl-C
    reaches every process: a copy still importing torch died of it with a traceback, Lightning's
    process observer then SIGKILLed the run (exit 137), and rank 0 could neither say it was
    interrupted nor print the --resume line. Now rank 0 alone answers such an early Ctrl-C and
    stops the copies (Lightning's graceful shutdown). An ignored signal survives exec; handlers do not."""
    launcher = getattr(trainer.strategy, "launcher", None)
    start = getattr(launcher, "_call_children_scripts", None)
    if start is None or threading.current_thread() is not threading.main_thread():
        return

    def start_deaf() -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            start()
        finally:
            signal.signal(signal.SIGINT, previous)
    launcher._call_children_scripts = start_deaf


def saving(fast_dev_run: bool, savers: list[Any], others: list[Any]) -> dict[str, Any]:
    """build_trainer's callbacks and checkpointing for a training job: its `savers` (ModelCheckpoint,
    ExportEMA, SaveLast, ...) then its `others`; no saver under --fast-dev-run, which saves nothing,
    since Lightning's ModelCheckpoint would still write last.ckpt into the folder that the real run
    then refuses."""
    if fast_dev_run:
        return {"callbacks": list(others), "enable_checkpointing": False}
    return {"callbacks": [*savers, *others]}
