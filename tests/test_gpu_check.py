"""bench/gpu_check.py must work before a GPU is available: its CPU dry run, tiny."""
from __future__ import annotations

import csv

from tests.tiny import load_script


def test_gpu_check_dry_run_on_cpu(tmp_path):
    module = load_script("bench/gpu_check.py", "gpu_check")
    rows = module.main(["--device", "cpu", "--tiny", "--train-steps", "2", "--out", str(tmp_path / "g.csv")])
    checks = [r["check"] for r in rows]
    assert any(c.startswith("sample sequential") for c in checks)
    assert any(c.startswith("exact inversion") for c in checks) and any(c.startswith("train") for c in checks)
    assert all(r["max_abs_diff_vs_cpu"] == 0.0 for r in rows)      # CPU against CPU: identical
    with open(tmp_path / "g.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
