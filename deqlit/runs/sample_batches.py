"""sample.py's finished batches on disk, so that a long run (thousands of images for FID) resumes.

A run folder holds run.json (what the run samples: seed, counts, chain, solver, weights) and, while
it runs, batches/batch-NNNNNN.pt, one per finished solve of `sampling.batch_size` images (x_0 and
the solve's figures). `python sample.py ... --resume` checks run.json against its own settings and
solves only the batches not on disk; the finished run's samples.pt holds every image and the
batch files are removed.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from deqlit.deq.solvers import SolverStats
from deqlit.guards import OutputFolderError, atomic_torch_save
from deqlit.runs.resume import differences, listed

RUN_FILE = "run.json"
BATCH_DIR = "batches"
# SolverStats' plain fields (its tensor traces stay behind).
STATS_FIELDS = tuple(f.name for f in fields(SolverStats) if f.name not in ("abs_trace", "rel_trace"))


def batch_path(folder: Path, index: int) -> Path:
    return Path(folder) / BATCH_DIR / f"batch-{index:06d}.pt"


def save_batch(folder: Path, index: int, x0: torch.Tensor, stats: SolverStats) -> None:
    """Batch `index`'s x_0 (B, C, H, W) and figures, written whole or not at all."""
    path = batch_path(folder, index)
    path.parent.mkdir(exist_ok=True)
    atomic_torch_save({"x0": x0.detach().cpu(),
                       "stats": {k: v for k, v in asdict(stats).items() if k in STATS_FIELDS}}, path)


def load_batches(folder: Path) -> dict[int, tuple[torch.Tensor, SolverStats]]:
    """The finished batches in `folder`: index -> (x_0 on the CPU, SolverStats)."""
    done = {}
    for path in sorted((Path(folder) / BATCH_DIR).glob("batch-*.pt")):
        try:
            record = torch.load(path, weights_only=True)
        except Exception as err:          # a file cut short by a full disk, say: solve it again
            print(f"sample.py: {path} is unreadable ({type(err).__name__}); its batch is solved again")
            continue
        done[int(path.stem.split("-")[1])] = (record["x0"], SolverStats(**record["stats"]))
    return done


def write_identity(folder: Path, identity: dict[str, Any]) -> None:
    (Path(folder) / RUN_FILE).write_text(json.dumps(identity, indent=2))


def check_resume(folder: Path, identity: dict[str, Any]) -> None:
    """OutputFolderError unless `folder` holds an unfinished run of exactly these settings."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        raise OutputFolderError(f"--resume: {folder} holds no sample.py run ({RUN_FILE} is missing): "
                                f"drop --resume to start one there")
    if (Path(folder) / "samples.pt").is_file():
        raise OutputFolderError(f"--resume: the run in {folder} has finished (samples.pt is there): "
                                f"nothing to resume")
    changed = differences(json.loads(path.read_text()), json.loads(json.dumps(identity)))
    if changed:
        raise OutputFolderError(f"--resume: the run in {folder} sampled other settings ({listed(changed)}): "
                                f"resume with the same flags, or choose another --out")


def finish(folder: Path) -> None:
    """Remove the batch files once samples.pt holds every image."""
    shutil.rmtree(Path(folder) / BATCH_DIR, ignore_errors=True)
