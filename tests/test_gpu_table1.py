"""bench/gpu_table1.py, the prepared GPU script, run on CPU with tiny nets: its CSV rows, and DEQ
x_0 against the sequential x_0 of the same x_T."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.tiny import load_script


@pytest.fixture(scope="module")
def table1():
    return load_script("bench/gpu_table1.py", "gpu_table1")


pytestmark = pytest.mark.usefixtures("one_thread")


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_every_row_and_deq_matches_sequential(table1, tmp_path, capsys):
    out = tmp_path / "t1.csv"
    table1.main(["--device", "cpu", "--tiny", "--deq-iters", "0", "--tol", "1e-6", "--out", str(out)])
    rows = read(out)
    assert list(rows[0]) == list(table1.FIELDS)
    expected = [(label, m) for label, _, _ in table1.SETTINGS
                for m in ("DDIM (sequential)", "DEQ-DDIM (anderson)", "DEQ-DDIM (triangular-anderson)",
                          "DEQ-DDIM (newton-scan)")]
    assert [(r["data"], r["method"]) for r in rows] == expected
    for r in rows:
        T = int(r["T"])
        assert T == table1.TINY_T[r["data"]] and 1 <= int(r["iterations"]) <= T
        assert float(r["seconds_per_image"]) > 0
        if r["method"].startswith("DEQ"):
            # Solved to 1e-6 (at most T iterations, where the chain is exact): x_0 is sequential's.
            assert float(r["x0_rmse_vs_sequential"]) < 1e-3
            seq = next(s for s in rows if s["data"] == r["data"] and s["method"].startswith("DDIM"))
            ratio = float(seq["seconds_per_image"]) / float(r["seconds_per_image"])
            assert float(r["speedup_vs_sequential"]) == pytest.approx(ratio, rel=1e-6)
    printed = capsys.readouterr().out
    assert "| CIFAR10 | 12 |" in printed and "| LSUN | 5 |" in printed


def test_fixed_iteration_mode_runs_exactly_k_iterations(table1, tmp_path):
    out = tmp_path / "k.csv"
    table1.main(["--device", "cpu", "--tiny", "--deq-iters", "3", "--max-batch", "5",
                 "--data", "CIFAR10", "--out", str(out)])
    rows = read(out)
    deq = [r for r in rows if r["method"].startswith("DEQ")]
    assert len(rows) == 1 + len(table1.SOLVERS) and all(int(r["iterations"]) == 3 and r["max_batch"] == "5" for r in deq)
    # 3 of 12 iterations leave x_0 unsettled: the check above is not vacuous.
    assert all(float(r["x0_rmse_vs_sequential"]) > 1e-6 for r in deq)


def test_sample_quality_reads_both_tolerances_off_one_solve():
    """bench/sample_quality.py records tol 1e-2 from the 1e-3 solve's callback: each image's x_0
    and iterations must equal those of a separate solve to 1e-2."""
    from tests.conftest import GaussianDataNoise

    from deqlit.diffusion.chain import Chain
    from deqlit.sampling import generate
    bench = load_script("bench/sample_quality.py", "sample_quality")
    model = GaussianDataNoise(seed=1)
    chain = Chain.build(model.abar, 20)
    x_T = bench.x_T_for(2, (1, 8, 8)).double()
    both = bench.solve_both_tolerances(model, x_T, chain, "anderson", max_batch=32)
    for tol in bench.TOLS:
        alone, stats = generate(model, x_T, chain, "anderson", max_batch=32, max_iter=chain.T, tol=tol,
                                **bench.SOLVER_OPTIONS["anderson"])
        x0, iters = both[tol]
        assert iters.tolist() == stats.image_iterations
        torch.testing.assert_close(x0, alone, rtol=0, atol=1e-12)
    assert (both[1e-2][1] < both[1e-3][1]).any()     # the loose tolerance does stop earlier
