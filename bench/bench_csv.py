"""The benchmarks' one CSV writer (bench/results/*.csv)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional, Sequence


def write_csv(rows: Sequence[dict], path, fieldnames: Optional[Sequence[str]] = None) -> Path:
    """Write rows (dicts) to path, creating its folder; columns are `fieldnames` or every key in the
    order first seen. Written through a temporary file, so an interrupted run never leaves a
    truncated CSV. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fieldnames) if fieldnames is not None else list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
