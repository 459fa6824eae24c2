"""Run-safety pieces shared by the commands: interrupts, output folders, atomic saves, finiteness.

Nothing here imports Lightning; the pieces wrap around a run (train.py's Trainer.fit, invert.py's
loop) and turn faults into exceptions that `deqlit.cli.run_main` prints as one line:

- `interrupts_as_exceptions()`: Ctrl-C and SIGTERM (what a cluster scheduler sends before it
  preempts a job) both raise KeyboardInterrupt once, so Lightning's graceful shutdown and the
  callbacks' `on_exception` run for either; on leaving, the exit they cause becomes
  `RunInterrupted(signum)`, which the entry point turns into "saved ..., resume with ...".
- `check_output_dir` / `refuse_existing_run`: fail before any compute, never overwrite a model.
- `atomic_torch_save`: a killed or disk-full write never leaves a half-written file at `path`.
- `first_nonfinite`: one host sync for a whole state_dict.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class UserInputError(ValueError):
    """Bad input the user can fix; the message says how. run_main prints it as one line."""


class OutputFolderError(UserInputError):
    """--out cannot be used: an existing file, unwritable, or an earlier run that would be overwritten."""


class CorruptCheckpointError(UserInputError):
    """A checkpoint to resume from cannot be read."""


class NonFiniteError(RuntimeError):
    """A loss, weights or EMA became NaN/Inf: the run stops instead of saving them."""


class DiskFullError(OSError):
    """ENOSPC while writing `filename`."""

    def __init__(self, path: str | Path):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}; free space "
                                       "or choose another --out", str(path))

    def __str__(self) -> str:
        return self.strerror


class RunInterrupted(Exception):
    """The run stopped on SIGINT/SIGTERM. `detail` says what was saved (e.g. 'saved X at step 12')."""

    def __init__(self, signum: int, detail: str = "", resumable: bool = True):
        self.signum = int(signum)
        self.detail = detail
        self.resumable = resumable  # False when nothing was saved: run_main prints no --resume
        name = signal.Signals(self.signum).name
        super().__init__(f"interrupted by {name}" + (f"; {detail}" if detail else ""))


# ---- interrupts ------------------------------------------------------------------------------
class Interrupts:
    """What `interrupts_as_exceptions` saw: the first signal number, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[Interrupts]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt (the first one only).

    Later signals are ignored, so that a second Ctrl-C or SIGTERM cannot break the checkpoint
    being written on the way out. Lightning's signal connector keeps a handler it finds installed
    and calls it after its own "Received SIGTERM" notice, so this also works around Trainer.fit;
    Lightning turns the KeyboardInterrupt into sys.exit(1) after its graceful shutdown (the
    callbacks' on_exception), and that exit, like a KeyboardInterrupt, leaves the block as
    RunInterrupted(signum). Outside the main thread (where signals cannot be set) it does nothing.
    """
    seen = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        if seen.signum is None:
            seen.signum = signum
            raise KeyboardInterrupt
        # a repeat while shutting down: ignored on purpose

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
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


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


def refuse_existing_run(out: Path, markers: Iterable[str], what: str = "an earlier run") -> None:
    """Raise OutputFolderError if `out` holds any of `markers` (e.g. 'checkpoints', 'ema.pt')."""
    # An empty checkpoints/ (a run stopped before its first save) holds nothing to lose.
    found = [m for m in markers if (out / m).is_file()
             or ((out / m).is_dir() and any((out / m).iterdir()))]
    if found:
        raise OutputFolderError(
            f"{out} holds {what} ({', '.join(found)}), which this run would overwrite: pass "
            f"--resume to continue it, or --out NEW_FOLDER to start a new run")


# ---- writes and reads ------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` via a temporary file in the same folder and os.replace.

    A reader sees the old file or the new one, never half of one (kill, full disk). A full disk
    raises DiskFullError naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # A Python file object, not a path: torch's own writer reports ENOSPC as
        # "unexpected pos ..." without an errno; Python's write raises OSError(ENOSPC).
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if find_enospc(err) is not None:
            raise DiskFullError(path) from err
        raise


def find_enospc(err: BaseException) -> OSError | None:
    """The OSError(ENOSPC) in `err`'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def check_checkpoint_readable(path: str | Path, start_over: str) -> None:
    """Open a checkpoint the way a resume will (weights_only, memory-mapped: no tensor is read).

    A truncated or garbled file raises CorruptCheckpointError naming it; `start_over` says how
    to begin again (e.g. 'pass --out NEW_FOLDER').
    """
    path = Path(path)
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... by cause
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        raise CorruptCheckpointError(
            f"cannot resume: {path} is corrupt or truncated ({type(err).__name__}: {reason}). "
            f"To start over, {start_over}") from err


# ---- finiteness ------------------------------------------------------------------------------
def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first key whose floating tensor holds NaN/Inf, or None; one host sync when all finite."""
    floats = [(k, v) for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return None
    flags = torch.stack([v.detach().isfinite().all().to(floats[0][1].device) for _, v in floats])
    if bool(flags.all()):
        return None
    return floats[int((~flags).nonzero()[0, 0])][0]


# ---- Lightning's advertisements --------------------------------------------------------------
_TIP_WORDS = ("litlogger", "litmodels")
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().lower()
        return not any(word in text for word in _TIP_WORDS)


def quiet_lightning_tips() -> None:
    """Drop Lightning's "Tip: try installing litlogger/litmodels" lines, and nothing else.

    A logging filter on the two loggers rank_zero_info writes to, installed by the entry point
    (cli.run_main), so importing deqlit changes nobody's logging.
    """
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
