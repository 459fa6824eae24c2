"""bench/inversion.py writes into --out (it always wrote bench/results/, so a small check run
overwrote the measured figures) and titles its plot with the settings."""
from __future__ import annotations

import csv
import sys

import pytest

from tests.tiny import REPO, load_script


@pytest.mark.slow
def test_small_run_writes_into_out_only(tmp_path, monkeypatch, one_thread):
    bench = load_script("bench/inversion.py", "bench_inversion")
    shipped = {p.name: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").glob("inversion*")}
    monkeypatch.setattr(sys, "argv", ["inversion.py", "--timesteps", "10", "--steps", "2", "--images", "1",
                                      "--memory-timesteps", "--solver", "triangular-anderson",
                                      "--out", str(tmp_path)])
    bench.main()
    with open(tmp_path / "inversion.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["deq", "baseline"]
    assert (tmp_path / "inversion_loss_vs_time.png").stat().st_size > 0
    assert {p.name: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").glob("inversion*")} == shipped
