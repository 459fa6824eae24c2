"""One run per output folder: an exclusive lock held while a command writes into the folder."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator, Optional

from deqlit.guards import OutputFolderError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold RUN/.lock (flock: released by the OS even when the process is killed), and remove it
    when the block ends, however it ends (a killed process leaves a file that holds no lock).

    A second process on the same folder gets OutputFolderError naming the holder's pid, instead of
    two runs mixing their state and logs.
    """
    path = Path(folder) / LOCK_NAME
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputFolderError(f"{folder} is in use by {holder}: wait for it to finish, or choose "
                                    f"another --out") from None
        try:   # the file we locked is still the folder's (not one a finishing run just removed)
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{command} (pid {os.getpid()})")
    handle.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()          # before unlocking: a waiting process then sees a fresh file
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def folder_holder(folder: Path) -> Optional[str]:
    """The command and pid holding `folder`'s lock now ('invert.py (pid 123)'), or None."""
    path = Path(folder) / LOCK_NAME
    try:
        handle = open(path)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None
