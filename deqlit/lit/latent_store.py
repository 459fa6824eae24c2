"""The latents table of joint fine-tuning and RowAdam's moments in memory-mapped files.

For a large fine-tuning set the table (N, D) and RowAdam's exp_avg / exp_avg_sq (N, D) are
3 x N x D float32: 2.4 GB for 64k images at 32x32x3, 150 GB for CelebA at 256x256x3. Here they
live in RUN/latents/ as .npy files opened with numpy.lib.format.open_memmap:

    weight.npy      float32 (N, D)   the table's rows (before the sphere projection)
    exp_avg.npy     float32 (N, D)   RowAdam's first moments
    exp_avg_sq.npy  float32 (N, D)   RowAdam's second moments
    step.npy        int64 (N,)       RowAdam's step count per row
    ready.npy       bool (N,)        the rows initialized so far
    journal-S.bin                    undo records since the checkpoint of global step S

The torch tensors share the mapped pages (torch.from_numpy), so a batch reads and writes only
its rows: resident memory grows with the rows touched, and those pages are file-backed (the
kernel drops them under pressure), not with N.

Resume = an uninterrupted run. A Lightning checkpoint of step S does not hold the table; it
records that the table is on disk, and the files are flushed when it is written. Training then
goes on writing rows in place, so the files run ahead of the last checkpoint; before a row is
first written after checkpoint S, its old values (row, step, ready, weight, exp_avg, exp_avg_sq)
are appended to journal-S.bin. Resuming from the checkpoint of step S replays the journals from
S on, newest first, which puts every row back to its value at S: exact after a crash, a kill or
an interrupt in the middle of a step. Journals older than the last `keep` checkpoints are
deleted (a resume from an older step-*.ckpt is refused, naming the oldest one possible); the
journals survive a killed process (written before the rows), not a power cut (no fsync).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from numpy.lib.format import open_memmap

from deqlit.lit.latent_table import to_sphere

TABLES = ("weight", "exp_avg", "exp_avg_sq")
DEFAULT_THRESHOLD_BYTES = 2 * 1024 ** 3


def table_bytes(num_images: int, dim: int) -> int:
    """Bytes of the table and RowAdam's two moments in float32: 3 x N x D x 4."""
    return 3 * int(num_images) * int(dim) * 4


def wants_disk(setting, num_images: int, dim: int, threshold_bytes: float = DEFAULT_THRESHOLD_BYTES) -> bool:
    """joint.latents_on_disk: true | false | auto (on disk when table_bytes exceeds the threshold)."""
    if setting is True or setting is False:
        return setting
    if setting in (None, "auto"):
        return table_bytes(num_images, dim) > threshold_bytes
    raise ValueError(f"--joint.latents_on_disk must be auto, true or false, got {setting!r}")


class DiskLatentStore:
    """The memory-mapped arrays of RUN/latents/ and their undo journal (see the module docstring).

    Not a torch.nn.Module and without a `to` method on purpose: Lightning moves tensors and
    objects with `to` to the device; these stay in the files."""

    def __init__(self, folder: str | Path, num_images: int, dim: int, create: bool, keep: int = 2):
        self.folder, self.num_images, self.dim, self.keep = Path(folder), int(num_images), int(dim), int(keep)
        shapes = {**{name: ((self.num_images, self.dim), np.float32) for name in TABLES},
                  "step": ((self.num_images,), np.int64), "ready": ((self.num_images,), np.bool_)}
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in self.folder.glob("journal-*.bin"):
                old.unlink()
        self.arrays: dict[str, np.memmap] = {}
        for name, (shape, dtype) in shapes.items():
            path = self.folder / f"{name}.npy"
            if create:
                self.arrays[name] = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
                continue
            if not path.is_file():
                raise FileNotFoundError(f"cannot resume: the latents table on disk is missing {path}; "
                                        f"run again without --resume (and with a new --out)")
            array = open_memmap(path, mode="r+")
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"{path} is {array.dtype} {array.shape}, this run needs {np.dtype(dtype)} "
                                 f"{shape}: the fine-tuning set or the image size changed since it was written")
            self.arrays[name] = array
        self.tensors = {name: torch.from_numpy(array) for name, array in self.arrays.items()}
        self.record_dtype = np.dtype([("row", "<i8"), ("step", "<i8"), ("ready", "?")]
                                     + [(name, "<f4", (self.dim,)) for name in TABLES])
        self.since: Optional[int] = None
        self._journal = None
        self._recorded: set[int] = set()
        if create:
            self._start_journal(0)

    # ---- tensors --------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.tensors["weight"]

    @property
    def exp_avg(self) -> torch.Tensor:
        return self.tensors["exp_avg"]

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        return self.tensors["exp_avg_sq"]

    @property
    def step(self) -> torch.Tensor:
        return self.tensors["step"]

    @property
    def ready(self) -> torch.Tensor:
        return self.tensors["ready"]

    # ---- the undo journal -----------------------------------------------------------------
    def _journal_path(self, since: int) -> Path:
        return self.folder / f"journal-{since:012d}.bin"

    def _journals(self) -> dict[int, Path]:
        return {int(p.stem.split("-")[1]): p for p in self.folder.glob("journal-*.bin")}

    def _start_journal(self, since: int) -> None:
        if self._journal is not None:
            self._journal.close()
        self._journal = open(self._journal_path(since), "ab")
        self.since, self._recorded = since, set()

    def record(self, rows: torch.Tensor) -> None:
        """Call before writing `rows` (any of the arrays): journals the rows' values as of the
        last checkpoint, the first time each is written after it."""
        if self._journal is None:
            raise RuntimeError("the on-disk latents were opened for a resume but not rolled back to "
                               "the checkpoint's step (rollback); nothing may be written before")
        fresh = [r for r in dict.fromkeys(int(r) for r in rows.flatten().tolist()) if r not in self._recorded]
        if not fresh:
            return
        records = np.empty(len(fresh), self.record_dtype)
        records["row"] = fresh
        for name in ("step", "ready", *TABLES):
            records[name] = self.arrays[name][fresh]
        records.tofile(self._journal)
        self._journal.flush()          # in the kernel before the rows change: survives a kill
        self._recorded.update(fresh)

    def checkpoint(self, step: int) -> None:
        """A Lightning checkpoint of global step `step` is being written: flush the arrays and
        start the journal of changes since `step` (the same step again keeps its journal)."""
        self.flush()
        if self.since == step:
            return
        self._start_journal(step)
        journals = self._journals()
        for old in sorted(journals)[:-(self.keep + 1)]:     # this one and the `keep` before it
            journals[old].unlink()

    def rollback(self, step: int) -> None:
        """Put every row back to its value at the checkpoint of global step `step`, then journal
        from there. Refused when the journals no longer reach back to `step`."""
        journals = self._journals()
        if step not in journals:
            oldest = min(journals) if journals else None
            raise ValueError(f"the latents on disk ({self.folder}) cannot be put back to step {step}: "
                             f"their undo journals start at step {oldest}; resume from the last "
                             f"checkpoint (--resume), or from one of step {oldest} or later")
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        for start in sorted((s for s in journals if s >= step), reverse=True):
            records = np.fromfile(journals[start], dtype=self.record_dtype) if journals[start].stat().st_size else []
            for lo in range(0, len(records), 256):       # bounded memory per chunk of rows
                chunk = records[lo:lo + 256]
                for name in ("step", "ready", *TABLES):
                    self.arrays[name][chunk["row"]] = chunk[name]
            if start != step:
                journals[start].unlink()
        self.flush()
        self._journal_path(step).write_bytes(b"")
        self._start_journal(step)

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()


def read_disk_latents(run_dir: str | Path, indices: torch.Tensor, sphere: bool = True,
                      image_shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """x_T of `indices` (B,) from a run whose table is on disk: (B, D), or (B, *image_shape), on
    the sphere of radius sqrt(D) when the run used it (what the run's latents.pt points to)."""
    weight = np.load(Path(run_dir) / "latents" / "weight.npy", mmap_mode="r")
    rows = torch.from_numpy(np.ascontiguousarray(weight[indices.long().numpy()]))
    rows = to_sphere(rows) if sphere else rows
    return rows if image_shape is None else rows.reshape(len(indices), *image_shape)
