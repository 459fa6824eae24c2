"""The errors a user can fix or must know of, and the writes and checks that raise them.

Below every package (lit/ modules raise NonFiniteError and save atomically; runs/ and the
commands catch): nothing here imports Lightning or another deqlit module. `deqlit.cli.run_main`
prints each error as one line.

- `atomic_torch_save`: a killed or disk-full write never leaves a half-written file at `path`.
- `first_nonfinite`: one host sync for a whole state_dict.
- `check_checkpoint_readable`: a corrupt resume checkpoint named before any compute.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


class UserInputError(ValueError):
    """Bad input the user can fix; the message says how. run_main prints it as one line."""


def first_few(items, limit: int = 12) -> str:
    """The first `limit` items joined by commas, then ', ...' if there are more (error messages
    that name images, files or indices)."""
    items = list(items)
    return ", ".join(str(i) for i in items[:limit]) + (", ..." if len(items) > limit else "")


def unread_flags(readers: dict[str, list[str]], context: str, fix: str) -> UserInputError:
    """The one-line refusal of typed flags a run would not read: readers {what reads them: [flag,
    ...]}; context, e.g. 'in this run (--method exact)'; fix, what to do instead ('{them}' becomes
    it/them). '--a, --b would do nothing CONTEXT: --a applies to X; --b applies to Y. Drop them, ...'."""
    given = [flag for group in readers.values() for flag in group]
    them = "it" if len(given) == 1 else "them"
    uses = "; ".join(f"{' and '.join(group)} {'applies' if len(group) == 1 else 'apply'} to {reader}"
                     for reader, group in readers.items())
    return UserInputError(f"{', '.join(given)} would do nothing {context}: {uses}. Drop {them}, or "
                          f"{fix.format(them=them)}")


class OutputFolderError(UserInputError):
    """--out cannot be used: an existing file, unwritable, or an earlier run that would be overwritten."""


class CorruptCheckpointError(UserInputError):
    """A checkpoint to resume from cannot be read."""


class NonFiniteError(RuntimeError):
    """A loss, weights or EMA became NaN/Inf: the run stops instead of saving them."""


class RankZeroStopped(RuntimeError):
    """Another process of a multi-process run: rank 0 stopped on an error that it reports itself.
    run_main prints one line with rank 0's reason, no traceback."""

    def __init__(self, reason: str):
        super().__init__(f"rank 0 stopped the run: {reason}")


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


