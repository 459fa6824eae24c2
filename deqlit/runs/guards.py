"""Run-safety pieces that wrap a run: interrupts, output folders, Lightning's tips.

- `interrupts_as_exceptions()`: Ctrl-C and SIGTERM (what a cluster scheduler sends before it
  preempts a job) both raise KeyboardInterrupt once, so Lightning's graceful shutdown and the
  callbacks' `on_exception` run for either; on leaving, the exit they cause becomes
  `RunInterrupted(signum)`, which the entry point turns into "saved ..., resume with ...";
  given the Trainer, a signal inside a training step waits for the step's end.
- `check_output_dir` / `refuse_existing_run`: fail before any compute, never overwrite a model.
- `FolderStart`: what a run wrote before its first result, removed if it fails before any.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from deqlit.guards import DiskFullError, OutputFolderError, RunInterrupted


# ---- interrupts ------------------------------------------------------------------------------
class Interrupts:
    """What `interrupts_as_exceptions` saw: the first signal number, or None; `in_step` while a
    training step runs (StopAtStepBoundary), when the first signal waits for the step's end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_step = False


class StopAtStepBoundary(Callback):
    """Lets a training step finish before an interrupt stops the run.

    A KeyboardInterrupt raised inside a step leaves it half done: the optimizer has stepped (the
    step counter grown) but the EMA has not, or the other way round, and the checkpoint saved on
    the way out holds a state that no uninterrupted run passes through. So the signal handler only
    records a signal that arrives inside a step, and it is raised here, before the next step starts
    (a signal during the last step lets the run finish)."""

    def __init__(self, seen: Interrupts) -> None:
        self.seen = seen

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.seen.signum is not None:
            self.seen.in_step = False
            raise KeyboardInterrupt
        self.seen.in_step = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.seen.in_step = False


@contextlib.contextmanager
def interrupts_as_exceptions(trainer: Any = None) -> Iterator[Interrupts]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt (the first one only).

    With a `trainer`, a signal that arrives during a training step is raised when the step has
    finished (StopAtStepBoundary, added to its callbacks). Later signals are ignored, so that a
    second Ctrl-C or SIGTERM cannot break the checkpoint being written on the way out. Lightning's
    signal connector keeps a handler it finds installed and calls it after its own "Received
    SIGTERM" notice, so this also works around Trainer.fit; Lightning turns the KeyboardInterrupt
    into sys.exit(1) after its graceful shutdown (the callbacks' on_exception), and that exit, like
    a KeyboardInterrupt, leaves the block as RunInterrupted(signum). Outside the main thread
    (where signals cannot be set) it does nothing.
    """
    seen = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        if seen.signum is None:
            seen.signum = signum
            _SIGNAL_SEEN["name"] = signal.Signals(signum).name
            launcher = sys.modules.get("deqlit.parallel.launch")    # loaded where copies were started
            if launcher is not None:
                launcher.forward_signal(signum)
            if seen.in_step:
                print(f"{signal.Signals(signum).name} received: stopping when this step ends",
                      file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt
        # a repeat while shutting down: ignored on purpose

    boundary = None
    if trainer is not None:
        boundary = StopAtStepBoundary(seen)
        trainer.callbacks.append(boundary)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield seen
    except (KeyboardInterrupt, SystemExit) as err:
        if seen.signum is None:
            raise
        raise RunInterrupted(seen.signum) from err
    finally:
        _SIGNAL_SEEN["name"] = None
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if boundary is not None:
            trainer.callbacks.remove(boundary)


# ---- output folders --------------------------------------------------------------------------
def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create `path` (a folder) if needed and prove it writable, before any compute is spent.

    Raises OutputFolderError naming the folder: an existing file, a parent that is a file, no
    permission, a read-only file system.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{flag} {path} is an existing file, not a folder: choose another "
                                f"{flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write, since permission bits say nothing about read-only mounts or ACLs.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(path) from err
        reason = err.strerror or type(err).__name__
        raise OutputFolderError(f"cannot write to {flag} {path} ({reason}): choose another {flag} "
                                "or fix the folder's permissions") from err
    return path


# What a run of any deqlit command leaves in its folder (train.py, joint fine-tuning, invert.py;
# sample.py's own outputs are listed in commands/sample.py): a new run of any command refuses a
# folder that holds one of them, so that no command writes into another's run (config.yaml, tb/).
RUN_FILES = ("config.yaml", "run.json", "checkpoints", "ema.pt", "latents.pt", "latents", "metrics.json",
             "tb", "samples.pt")


def refuse_existing_run(out: Path, markers: Iterable[str] = RUN_FILES, what: str = "an earlier run") -> None:
    """Raise OutputFolderError if another process holds `out` (folder_lock) or `out` holds any of
    `markers` (by default what any deqlit run leaves, RUN_FILES)."""
    from deqlit.runs.folder_lock import folder_holder
    holder = folder_holder(out)
    if holder is not None:
        raise OutputFolderError(f"{out} is in use by {holder}: wait for it to finish, or choose another --out")
    # An empty checkpoints/ (a run stopped before its first save) holds nothing to lose.
    found = [m for m in markers if (out / m).is_file()
             or ((out / m).is_dir() and any((out / m).iterdir()))]
    if found:
        # --resume continues a training run (its checkpoints); another command's run it cannot.
        resume = "--resume to continue it, or " if "checkpoints" in found or "ema.pt" in found else ""
        raise OutputFolderError(
            f"{out} holds {what} ({', '.join(found)}), which this run would overwrite: pass "
            f"{resume}--out NEW_FOLDER to start a new run")


class FolderStart:
    """What a run creates in its folder before its first result, undone if it fails before any.

    A run that stopped on an error before any result (files matching `results` in the folder, e.g.
    invert.py's finished or saved batches) holds nothing to resume, but its run.json would make
    the corrected rerun refuse the folder as an earlier run. An interrupt (Ctrl-C, SIGTERM) keeps
    everything: it prints a --resume command. Made before the folder is (it notes whether it was).
    """

    def __init__(self, out: Path, results: str) -> None:
        self.out, self.results, self.made_folder = Path(out), results, not Path(out).exists()
        self.created: list[Path] = []

    def creates(self, *paths: Path) -> None:
        """Note the paths (files or folders) that do not exist yet: this run makes them."""
        self.created += [p for p in paths if not p.exists()]

    def holds_results(self) -> bool:
        return any(self.out.glob(self.results))

    def undo(self) -> None:
        for path in self.created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Undo, and remove the folder if this run made it (empty once the lock has let go of .lock)."""
        self.undo()
        if self.made_folder:
            with contextlib.suppress(OSError):
                self.out.rmdir()

    @contextlib.contextmanager
    def undone_on_failure(self):
        try:
            yield
        except Exception as err:
            if not isinstance(err, RunInterrupted) and not self.holds_results():
                self.discard()
            raise


# ---- Lightning's advertisements and notices -------------------------------------------------
_TIP_WORDS = ("litlogger", "litmodels")
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# The signal that interrupts_as_exceptions turned into a KeyboardInterrupt, while its block runs.
_SIGNAL_SEEN: dict[str, str | None] = {"name": None}


class _DropLightningTips(logging.Filter):
    """Drops the tips; names the real signal in Lightning's "Detected KeyboardInterrupt" notice
    (a SIGTERM reaches Lightning as the KeyboardInterrupt that interrupts_as_exceptions raises)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        name = _SIGNAL_SEEN["name"]
        if name not in (None, "SIGINT") and "Detected KeyboardInterrupt" in text:
            record.msg, record.args = text.replace("Detected KeyboardInterrupt", f"Detected {name}"), ()
        return not any(word in text.lower() for word in _TIP_WORDS)


def quiet_lightning_tips() -> None:
    """Drop Lightning's "Tip: try installing litlogger/litmodels" lines and its pytree helper's
    LeafSpec deprecation warning (torch >= 2.10); say SIGTERM, not KeyboardInterrupt, in its
    shutdown notice when a SIGTERM stopped the run.

    A logging filter on the two loggers rank_zero_info writes to, installed by the entry point
    (cli.run_main), so importing deqlit changes nobody's logging.
    """
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
    # Lightning 2.6's own pytree helper builds torch's deprecated LeafSpec on every predict /
    # fit batch: a FutureWarning about Lightning's code that the user can do nothing about.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
