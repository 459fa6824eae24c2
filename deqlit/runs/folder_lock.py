"""One run per output folder: an exclusive lock held while a command writes into the folder."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from deqlit.guards import OutputFolderError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold RUN/.lock (flock: released by the OS even when the process is killed).

    A second process on the same folder gets OutputFolderError naming the holder's pid, instead of
    two runs mixing their state and logs.
    """
    path = Path(folder) / LOCK_NAME
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputFolderError(f"{folder} is in use by {holder}: wait for it to finish, or choose "
                                f"another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{command} (pid {os.getpid()})")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
