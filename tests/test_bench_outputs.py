"""bench/model_quality.py and bench/sharding.py write into --out (they always wrote bench/results/,
so a small check run overwrote the measured figures)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.tiny import REPO, load_script


def results_stamps() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").iterdir() if p.is_file()}


@pytest.mark.slow
def test_model_quality_writes_into_out(tmp_path, monkeypatch, one_thread):
    before = results_stamps()
    bench = load_script("bench/model_quality.py", "bench_model_quality")
    monkeypatch.setattr(sys, "argv", ["model_quality.py", "--num-samples", "2", "--timesteps", "3",
                                      "--out", str(tmp_path)])
    bench.main()
    assert json.loads((tmp_path / "model_quality.json").read_text())["heldout_denoise_mse"] > 0
    assert (tmp_path / "model_samples.png").stat().st_size > 0
    assert results_stamps() == before


@pytest.mark.slow
def test_sharding_writes_into_out(tmp_path):
    before = results_stamps()
    # its workers are spawned processes, which cannot unpickle a module loaded by path: run the script
    subprocess.run([sys.executable, str(REPO / "bench" / "sharding.py"), "--timesteps", "4", "--shards", "1",
                    "--iters", "1", "--out", str(tmp_path / "s.csv")], check=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(tmp_path / "s.csv") as fh:
        assert [(r["T"], r["K"]) for r in csv.DictReader(fh)] == [("4", "1")]
    assert results_stamps() == before
