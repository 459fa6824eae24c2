"""sample.py's finished batches on disk, so that a long run (thousands of images for FID) resumes.

A run folder holds run.json (what the run samples: seed, counts, chain, solver, weights, data
replicas) and, while it runs, batches/batch-NNNNNN.pt, one per finished solve of
`sampling.batch_size` images (x_0 and the solve's figures); with several data replicas
(--trainer.strategy ddp_time over more processes than time shards) each replica numbers its own
batches, batches/replica-RRR-batch-NNNNNN.pt. `python sample.py ... --resume` checks run.json
against its own settings and solves only the batches not on disk; the finished run's samples.pt
holds every image and the batch files are removed.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

import torch

from deqlit.deq.solvers import SolverStats
from deqlit.guards import OutputFolderError, atomic_torch_save
from deqlit.runs.resume import differences, listed

RUN_FILE = "run.json"
BATCH_DIR = "batches"
# SolverStats' plain fields (its tensor traces stay behind).
STATS_FIELDS = tuple(f.name for f in fields(SolverStats) if f.name not in ("abs_trace", "rel_trace"))


BATCH_FILES = f"{BATCH_DIR}/*.pt"      # every replica's batch files, as a glob in the run folder


def batch_prefix(replica: int, replicas: int) -> str:
    """The file-name prefix of a replica's batches: 'batch-' in a run of one replica."""
    return "batch-" if replicas == 1 else f"replica-{replica:03d}-batch-"


def batch_path(folder: Path, index: int, replica: int = 0, replicas: int = 1) -> Path:
    return Path(folder) / BATCH_DIR / f"{batch_prefix(replica, replicas)}{index:06d}.pt"


def save_batch(folder: Path, index: int, x0: torch.Tensor, stats: SolverStats,
               replica: int = 0, replicas: int = 1) -> None:
    """Batch `index` (of data replica `replica`): its x_0 (B, C, H, W) and figures, written whole
    or not at all."""
    path = batch_path(folder, index, replica, replicas)
    path.parent.mkdir(exist_ok=True)
    atomic_torch_save({"x0": x0.detach().cpu(),
                       "stats": {k: v for k, v in asdict(stats).items() if k in STATS_FIELDS}}, path)


def finished_batches(folder: Path, replica: int = 0, replicas: int = 1) -> list[int]:
    """The indices of a replica's batch files that load (a file cut short by a full disk, say, is
    named and left out: its batch is solved again)."""
    prefix = batch_prefix(replica, replicas)
    found = []
    for path in sorted((Path(folder) / BATCH_DIR).glob(f"{prefix}*.pt")):
        try:
            torch.load(path, weights_only=True)
        except Exception as err:
            print(f"sample.py: {path} is unreadable ({type(err).__name__}); its batch is solved again")
            continue
        found.append(int(path.stem[len(prefix):]))
    return found


def load_batches(folder: Path, indices: Optional[list[int]] = None, replica: int = 0,
                 replicas: int = 1) -> dict[int, tuple[torch.Tensor, SolverStats]]:
    """A replica's finished batches in `folder` (`indices`: those of finished_batches, by default
    all that load): index -> (x_0 on the CPU, SolverStats)."""
    if indices is None:
        indices = finished_batches(folder, replica, replicas)
    done = {}
    for index in indices:
        record = torch.load(batch_path(folder, index, replica, replicas), weights_only=True)
        done[index] = (record["x0"], SolverStats(**record["stats"]))
    return done


# Keys of every sample.py run.json (invert.py's run.json holds other ones).
SAMPLE_RUN_KEYS = ("seed", "solver", "solver_options", "num_images")


def holds_sample_run(folder: Path) -> bool:
    """True when `folder` holds a sample.py run.json (the run --resume continues)."""
    try:
        saved = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and all(key in saved for key in SAMPLE_RUN_KEYS)


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
        # The data replicas follow the process layout, which no sampling flag names.
        layout = (" (start it with the same --trainer.devices / --parallel.time_shards)"
                  if any(key == "data_replicas" for key, _, _ in changed) else "")
        raise OutputFolderError(f"--resume: the run in {folder} sampled other settings ({listed(changed)}): "
                                f"resume with the same flags{layout}, or choose another --out")


def finish(folder: Path) -> None:
    """Remove the batch files once samples.pt holds every image."""
    shutil.rmtree(Path(folder) / BATCH_DIR, ignore_errors=True)
