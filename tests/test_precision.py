"""Half precisions on a CPU: sample.py's placement() computes as Lightning's Trainer does (which runs
16-mixed as bf16-mixed there), and a float16 choice that would crawl is said, not silently run."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from deqlit.devices import AUTOCAST, placement, precision_note


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true", "64-true", "16-true"])
def test_placement_on_a_cpu_computes_in_the_precision_lightning_resolves(precision):
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    _, dtype, autocast = placement({"accelerator": "cpu", "precision": precision})
    resolved = str(trainer.precision)
    if resolved in AUTOCAST:
        assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == AUTOCAST[resolved]
        assert dtype == torch.float32
    else:
        assert not isinstance(autocast, torch.autocast)
        assert dtype == {"32-true": torch.float32, "64-true": torch.float64, "16-true": torch.float16}[resolved]


def test_float16_on_a_cpu_is_said_and_nothing_else_is():
    assert "runs as bf16-mixed" in precision_note("cpu", "16-mixed")
    assert "50x slower" in precision_note("cpu", "16-true")
    for device, precision in [("cpu", "32-true"), ("cpu", "bf16-mixed"), ("cpu", "64-true"),
                              ("cuda", "16-mixed"), ("cuda", "16-true")]:
        assert precision_note(device, precision) is None


def test_a_gpu_keeps_float16_autocast():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _, _, autocast = placement({"accelerator": "gpu", "precision": "16-mixed"})
    assert autocast.fast_dtype == torch.float16


def test_a_tolerance_below_a_half_precisions_rounding_is_said_with_what_to_do():
    from deqlit.devices import resolved_precision, tolerance_note
    assert resolved_precision("cpu", "16-mixed") == "bf16-mixed"
    assert resolved_precision("cuda", "16-mixed") == "16-mixed"
    note = tolerance_note("bf16-mixed", 1e-3, "--tol")
    assert "--tol 0.001 is below what bf16-mixed resolves" in note and "--tol 0.004" in note
    assert "16-mixed resolves" in tolerance_note("16-mixed", 1e-4, "--tol")
    for precision, tol in [("bf16-mixed", 5e-3), ("16-mixed", 1e-3), ("32-true", 1e-6), ("64-true", 0.0),
                           ("bf16-mixed", 0.0)]:
        assert tolerance_note(precision, tol, "--tol") is None


def test_an_exact_inversion_that_misses_tol_in_half_precision_names_the_precision_first():
    from deqlit.deq.inversion_report import remedies
    half = remedies(10, "per-step", "anderson", 20, "bf16-mixed", 1e-4)
    assert half.startswith("--trainer.precision 32-true (bf16-mixed rounds to 3.9e-03, above tol 0.0001")
    assert "--timesteps 20" in half                      # the other remedies follow
    for precision, tol in [("32-true", 1e-4), ("bf16-mixed", 1e-2), (None, 1e-4)]:
        assert "--trainer.precision" not in remedies(10, "per-step", "anderson", 20, precision, tol)


def test_sample_says_when_its_tol_is_below_the_precisions_rounding(tmp_path, capsys):
    from deqlit.commands.sample import main as sample_main
    base = ["--timesteps", "3", "--num-images", "1", "--no-progress", "--trainer.accelerator", "cpu"]
    sample_main([*base, "--trainer.precision", "bf16-mixed", "--out", str(tmp_path / "a")])
    assert "--tol 0.001 is below what bf16-mixed resolves" in capsys.readouterr().out
    sample_main([*base, "--trainer.precision", "bf16-mixed", "--tol", "0.004", "--out", str(tmp_path / "b")])
    sample_main([*base, "--out", str(tmp_path / "c")])
    assert "resolves" not in capsys.readouterr().out


def test_the_half_precision_benchmark_writes_its_rows_side_by_side(tmp_path, monkeypatch, capsys):
    import csv
    import sys

    from tests.tiny import load_script
    bench = load_script("bench/half_precision.py", "bench_half_precision")
    out = tmp_path / "hp.csv"
    monkeypatch.setattr(sys, "argv", ["half_precision.py", "--timesteps", "3", "--images", "1",
                                      "--tols", "1e-3", "--out", str(out)])
    bench.main()
    rows = list(csv.DictReader(out.open()))
    assert [(r["precision"], r["solver"]) for r in rows] == [
        ("32-true", "sequential"), ("bf16-mixed", "sequential"), ("32-true", "newton-scan"),
        ("bf16-mixed", "newton-scan")]
    assert float(rows[0]["x0_rmse_vs_float32_sequential"]) == 0.0            # the reference itself
    assert 0 < float(rows[1]["x0_rmse_vs_float32_sequential"]) < 0.05       # bf16 rounds, a little
    assert all(1 <= int(r["iterations"]) <= 3 for r in rows)
    assert "the iterations of 32-true" in capsys.readouterr().out


def test_jobs_with_a_trainer_say_a_tol_below_the_resolved_precisions_rounding(capsys):
    """invert.py --method deq and joint fine-tuning print it from the Trainer's resolved precision:
    16-mixed on a CPU is bf16-mixed there, so its tol is judged against bf16's rounding."""
    from deqlit.runs.trainer import note_tolerance
    for precision, tol, said in [("16-mixed", 1e-3, True), ("bf16-mixed", 1e-2, False), ("32-true", 1e-6, False)]:
        trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False)
        capsys.readouterr()
        note_tolerance(trainer, tol, "--joint.tol")
        out = capsys.readouterr().out
        assert ("--joint.tol 0.001 is below what bf16-mixed resolves" in out) == said, (precision, out)
