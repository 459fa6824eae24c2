"""What a new user types wrong is refused before any work, in one `error:` line with exit code 2:
a misspelt key inside an option mapping (inversion.exact, joint.adjoint), a bad flag value (no
argparse usage block), and a flag the run would never read. What a config file sets is a default
and is never refused. All in-process, through cli.run_main, on faces.yaml (nothing is loaded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deqlit.cli import run_main
from deqlit.commands import invert, sample
from deqlit.deq.inversion import EXACT_ON_FAIL, InversionSettings
from deqlit.deq.inversion_report import InversionReport, failure_message
from deqlit.runs.sections import resolve
from tests.tiny import load_script

REPO = Path(__file__).resolve().parent.parent
FACES = REPO / "configs" / "faces.yaml"


train_script = load_script("train.py", "deqlit_train_script_refusals")
SCRIPTS = {"invert.py": invert.main, "train.py": train_script.main, "sample.py": sample.main}


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python SCRIPT ARGV`, in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(SCRIPTS[script], argv, script=script)
    code = stop.value.code
    captured = capsys.readouterr()
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def refused(script: str, argv: list[str], capsys, tmp_path) -> str:
    """The one error line of a command refused with exit code 2 before it wrote anything."""
    out = tmp_path / "run"
    code, _, err = run(script, [*argv, "--out", str(out)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()
    return lines[0]


# ---- keys inside inversion.exact and joint.adjoint ---------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--inversion.exact.tool", "1e-3"], ["unknown key 'tool' in inversion.exact",
                                          "did you mean --inversion.exact.tol?"]),
    (["--inversion.exact.solver", "picard", "--inversion.exact.m", "3"],
     ["--inversion.exact.m is an option of solver anderson", "not of 'picard'"]),
    (["--inversion.exact.mode", "per-stpe"], ["--inversion.exact.mode must be one of all-timesteps, per-step"]),
    (["--inversion.exact.on_fail", "bogus"], ["--inversion.exact.on_fail must be one of warn, raise"]),
    (["--inversion.exact.max_iter", "0"], ["--inversion.exact.max_iter must be an integer >= 1"]),
])
def test_a_bad_key_or_value_of_inversion_exact_is_refused_by_name(tmp_path, capsys, argv, words):
    line = refused("invert.py", [*argv, "--num-images", "1", "--timesteps", "3"], capsys, tmp_path)
    for word in words:
        assert word in line


def test_a_bad_key_of_joint_adjoint_is_refused_by_name(tmp_path, capsys):
    line = refused("train.py", ["--task", "joint", "--joint.adjoint.tol", "0"], capsys, tmp_path)
    assert "unknown key 'tol' in joint.adjoint" in line and "'sweep' takes no options" in line
    line = refused("train.py", ["--task", "joint", "--joint.adjoint", "{solver: picard, frezee: true}"],
                   capsys, tmp_path)
    assert "unknown key 'frezee'" in line and "did you mean --joint.adjoint.freeze?" in line


def test_print_config_lists_on_fail_and_honours_the_exact_keys(capsys):
    code, out, _ = run("invert.py", ["--inversion.exact.on_fail", "raise", "--inversion.exact.m", "2",
                                     "--print_config"], capsys)
    exact = yaml.safe_load(out)["inversion"]["exact"]
    assert code == 0 and exact["on_fail"] == "raise" and exact["m"] == 2
    code, out, _ = run("invert.py", ["--print_config"], capsys)
    assert code == 0 and yaml.safe_load(out)["inversion"]["exact"]["on_fail"] == "warn"


def test_resolving_twice_changes_nothing():
    cfg = resolve(yaml.safe_load(FACES.read_text()), "joint")
    assert resolve(cfg, "joint") == cfg


def test_settings_refuse_a_bad_exact_key_before_any_work():
    with pytest.raises(ValueError, match="unknown key 'tool' in inversion.exact"):
        InversionSettings(method="exact", init="exact", exact={"tool": 1e-3}).validate()


def test_the_on_fail_values_accepted_are_the_ones_the_messages_name():
    """The not-converged error recommends an on_fail value the settings accept."""
    report = InversionReport(row_residual=[[1.0]], image_residual=[1.0], image_iterations=[20],
                             network_evals=[21], depth=21, start_depth=1, mode="per-step",
                             solver="anderson", contraction=[0.5])
    report.timesteps = [0]
    report.finalize(1e-4)
    message = failure_message(report, 20)
    assert "--inversion.exact.on_fail warn" in message and "warn" in EXACT_ON_FAIL
    InversionSettings(method="exact", init="exact", exact={"on_fail": "warn"}).validate()
    with pytest.raises(ValueError, match="on_fail must be one of warn, raise"):
        InversionSettings(method="exact", init="exact", exact={"on_fail": "bogus"}).validate()


# ---- bad flag values: one line, no usage block --------------------------------------------------
@pytest.mark.parametrize("script, argv, flag", [
    ("invert.py", ["--num-images", "0"], "--num-images"),
    ("invert.py", ["--batch-size", "0"], "--batch-size"),
    ("invert.py", ["--timesteps", "0"], "--timesteps"),
    ("invert.py", ["--skip", "bogus"], "--skip"),
    ("invert.py", ["--factor", "0"], "--factor"),
    ("train.py", ["--max-steps", "0"], "--max-steps"),
    ("train.py", ["--task", "bogus"], "--task"),
    ("sample.py", ["--timesteps", "0"], "--timesteps"),
])
def test_a_bad_flag_value_is_one_line_that_points_to_help(tmp_path, capsys, script, argv, flag):
    line = refused(script, argv, capsys, tmp_path)
    assert line.startswith(f"error: argument {flag}:") and line.endswith("(see --help)")


@pytest.mark.parametrize("key", ["checkpoint_every", "kid_every", "image_every", "compare_every"])
def test_a_negative_period_of_a_joint_run_is_one_line(tmp_path, capsys, key):
    """--joint.checkpoint_every -1 was Lightning's traceback; --joint.kid_every -1 ran KID every step."""
    line = refused("train.py", ["--task", "joint", f"--joint.{key}", "-1"], capsys, tmp_path)
    assert line == f"error: --joint.{key} must be a number of steps >= 0, got -1"


# ---- flags the run would never read ------------------------------------------------------------
@pytest.mark.parametrize("script, argv, words", [
    ("train.py", ["--max-steps", "2", "--ckpt", "SOMEFILE"], ["--ckpt would do nothing with --task train",
                                                             "--task joint", "--init"]),
    ("train.py", ["--max-steps", "2", "--joint.num_images", "3"],
     ["--joint.num_images would do nothing with --task train", "--task joint (the joint section)"]),
    ("train.py", ["--task", "joint", "--init", "w.pt"], ["--init would do nothing with --task joint"]),
    ("train.py", ["--task", "joint", "--train.lr", "0.1"], ["--train.lr would do nothing with --task joint"]),
    ("train.py", ["--max-steps", "2", "--sampling.timesteps", "5"], ["--sampling.timesteps", "sample.py"]),
    ("invert.py", ["--inversion.exact.init", "extrapolated"],
     ["--inversion.exact.init would do nothing", "--inversion.exact.mode all-timesteps"]),
    ("train.py", ["--task", "joint", "--joint.compare_every", "0", "--joint.adjoint.solver", "picard"],
     ["--joint.adjoint.solver would do nothing with --joint.grad onestep", "--joint.grad ift"]),
    ("invert.py", ["--inversion.exact", "{mode: per-step, init: extrapolated}"],   # the mapping form
     ["init in --inversion.exact would do nothing", "--inversion.exact.mode all-timesteps"]),
    ("invert.py", ["--method", "deq", "--inversion.optimize_noise", "true"],
     ["--inversion.optimize_noise would do nothing", "--eta above 0"]),
    ("invert.py", ["--method", "deq", "--solver", "newton-scan", "--inversion.m", "3"],
     ["--inversion.m would do nothing", "--solver anderson or triangular-anderson"]),
    ("train.py", ["--task", "joint", "--joint.m", "5"],       # faces.yaml's joint.solver: newton-scan
     ["--joint.m would do nothing with --joint.solver newton-scan",
      "--joint.solver anderson or triangular-anderson"]),
    ("train.py", ["--task", "joint", "--joint.solver", "sequential", "--joint.tol", "0.1"],
     ["--joint.tol would do nothing with --joint.solver sequential"]),
])
def test_a_flag_the_run_never_reads_is_refused(tmp_path, capsys, script, argv, words):
    line = refused(script, [*argv, "--num-images", "1"] if script == "invert.py" else argv,
                   capsys, tmp_path)
    for word in words:
        assert word in line


def test_exact_init_is_named_once_where_exact_is_not_used(tmp_path, capsys):
    line = refused("invert.py", ["--method", "deq", "--inversion.exact.init", "extrapolated"], capsys, tmp_path)
    assert line.count("--inversion.exact.init") == 2   # the list of flags, and what it applies to
    assert "--method exact or --init exact" in line


@pytest.mark.parametrize("argv", [
    ["--inversion.exact.mode", "all-timesteps", "--inversion.exact.init", "extrapolated"],
    ["--inversion.exact", "{mode: all-timesteps, init: extrapolated}"],
    ["--method", "deq", "--eta", "0.5", "--inversion.optimize_noise", "true"],
    ["--inversion.exact.on_fail", "warn"],
])
def test_the_same_flags_where_the_run_reads_them_are_accepted(capsys, argv):
    code, _, err = run("invert.py", [*argv, "--print_config"], capsys)
    assert code == 0, err


def test_config_file_values_are_defaults_never_refused(tmp_path, capsys):
    cfg = yaml.safe_load(FACES.read_text())
    cfg["inversion"].update(optimize_noise=True, method="deq", m=4)
    cfg["inversion"]["exact"]["init"] = "extrapolated"          # per-step: unread, but not typed
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, _, err = run("invert.py", ["--config", str(config), "--print_config"], capsys)
    assert code == 0, err
    code, _, err = run("train.py", ["--config", str(config), "--print_config"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("argv", [
    ["--joint.adjoint.solver", "picard"],                                  # faces.yaml: compare_every 25
    ["--joint.grad", "ift", "--joint.compare_every", "0", "--joint.adjoint", "{solver: picard}"],
])
def test_a_joint_adjoint_that_some_solve_reads_is_accepted(capsys, argv):
    code, _, err = run("train.py", ["--task", "joint", *argv, "--print_config"], capsys)
    assert code == 0, err
