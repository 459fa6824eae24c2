"""Expected user errors become one `error: ...` line with a known exit code (cli.run_main), and
--debug / DEQLIT_DEBUG=1 bring the traceback back.

Most cases call run_main in-process (same code path, same exit code and stderr as the script);
a few run the real scripts, where the command line itself is what is tested.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqlit.cli import describe_error, positive_int, resume_command, run_main
from deqlit.config import ConfigError
from deqlit.deq.solvers import SolverDivergedError
from deqlit.guards import RunInterrupted
from deqlit.runs.guards import quiet_lightning_tips
from deqlit.models.loading import CheckpointFormatError, read_state_dict

REPO = Path(__file__).resolve().parent.parent


def _load_train_script():
    spec = importlib.util.spec_from_file_location("deqlit_train_script_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _load_train_script()


def run(main, argv: list[str], capsys, script: str = "train.py") -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv, script=script)
    code = exc.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def raising(err: BaseException):
    def main(argv: list[str]) -> None:
        raise err
    return main


# ---- config overrides and counts, through train.py's parser ----------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--inversoin.tau", "0.1"], ["unknown config section 'inversoin'", "did you mean --inversion.tau?"]),
    (["--inversion.tau", "abc"], ["--inversion.tau expects a number", "0.1", "'abc'"]),
    (["--train.max_steps", "2.5"], ["--train.max_steps expects an integer"]),
    (["--model.ch_mult", "3"], ["--model.ch_mult expects a list"]),
    (["--train.hflip", "yes please"], ["--train.hflip expects true or false"]),
    (["--train.max_steps", "0"], ["--train.max_steps must be a positive integer, got 0"]),
    (["--train.lr", "-1e-3"], ["--train.lr (--lr) must be a positive number"]),
])
def test_config_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    code, err = run(train_script.main, argv + ["--out", str(out)], capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[-1]
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("flag", ["--max-steps", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_zero_negative_or_non_integer_counts_are_refused_by_the_parser(tmp_path, capsys, flag, value):
    code, err = run(train_script.main, [flag, value, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and f"argument {flag}:" in err and "positive integer" in err
    assert not (tmp_path / "r").exists()


def test_positive_int():
    assert positive_int("3") == 3
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(Exception, match="positive integer"):
            positive_int(bad)


# ---- the mapping of run failures --------------------------------------------------------------
def test_full_disk_anywhere_in_the_chain_says_no_space_and_where(capsys):
    inner = OSError(errno.ENOSPC, "No space left on device", "/data/run/ema.pt")
    try:
        try:
            raise inner
        except OSError as cause:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from cause
    except RuntimeError as chained:
        err = chained
    code, text = run(raising(err), [], capsys)
    assert code == 1
    assert text.strip() == ("error: no space left on device while writing /data/run/ema.pt; "
                            "free space or choose another --out")


def test_solver_divergence_and_permission_are_one_line(capsys):
    code, err = run(raising(SolverDivergedError("the fixed-point solve diverged at iteration 1")), [],
                    capsys, "sample.py")
    assert code == 1 and err.strip() == "error: the fixed-point solve diverged at iteration 1"
    code, err = run(raising(PermissionError(errno.EACCES, "Permission denied", "/ro/x.png")), [], capsys)
    assert code == 2 and "permission denied /ro/x.png" in err


def test_a_bug_keeps_its_traceback():
    assert describe_error(KeyError("x")) is None and describe_error(TypeError("x")) is None
    with pytest.raises(TypeError):
        run_main(raising(TypeError("a bug")), [], script="train.py")


def test_debug_flag_and_environment_show_the_traceback(monkeypatch):
    seen = []

    def main(argv):
        seen.append(argv)
        raise ConfigError("bad value")

    with pytest.raises(ConfigError):
        run_main(main, ["--x", "--debug"], script="train.py")
    assert seen[-1] == ["--x"]  # --debug is the wrapper's, not passed on
    monkeypatch.setenv("DEQLIT_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_main(main, [], script="train.py")


def test_interrupt_prints_the_resume_command_and_exits_128_plus_signal(capsys):
    argv = ["--out", "my runs/a", "--model.ch_mult", "[1,2]"]
    code, err = run(raising(RunInterrupted(15, "saved X at step 7")), argv, capsys)
    assert code == 143
    assert "train.py: interrupted by SIGTERM; saved X at step 7" in err
    assert "resume with: python train.py --out 'my runs/a' --model.ch_mult '[1,2]' --resume" in err
    code, err = run(raising(RunInterrupted(2, "nothing saved", resumable=False)), argv, capsys)
    assert code == 130 and "resume with" not in err
    assert resume_command("invert.py", ["--resume", "--out", "d"]) == "python invert.py --resume --out d"


def test_an_interrupted_process_other_than_rank_0_leaves_the_resume_command_to_rank_0(capsys, monkeypatch):
    """Every process of a multi-process run is interrupted; one resume line (rank 0's) is enough,
    and a copy started by Lightning would print it with its own absolute script path."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, err = run(raising(RunInterrupted(2, "saved X at step 7")), ["--out", "a"], capsys)
    assert code == 130 and "train.py (process 1): interrupted by SIGINT" in err and "resume with" not in err


# ---- checkpoints: malicious pickles and a DDIM file without EMA -------------------------------
class _Payload:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_as_code(tmp_path):
    marker = tmp_path / "it_ran"
    zipped = tmp_path / "model.pt"
    torch.save({"conv_in.weight": torch.ones(1), "x": _Payload(marker)}, zipped)  # saving runs nothing
    raw = tmp_path / "legacy.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for path in (zipped, raw):
        with pytest.raises(CheckpointFormatError) as exc:
            read_state_dict(path)
        text = str(exc.value)
        assert f"{path} contains code that deqlit refuses to run" in text
        assert "system" in text and "re-download" not in text
    assert not marker.exists()


def test_ddim_ckpt_without_ema_gives_the_command_line_form(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save([{"module.conv_in.weight": torch.ones(1)}, {}, 1, 10], path)
    with pytest.raises(CheckpointFormatError, match=r"--checkpoint\.ema false.*ema=False"):
        read_state_dict(path, ema=True)


# ---- Lightning's advertisement ----------------------------------------------------------------
def test_lightning_tips_are_dropped_and_other_messages_kept(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_lightning_tips()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        rank_zero_info("💡 Tip: try installing [litmodels](https://pypi.org/project/litmodels/)")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=2` reached.")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["`Trainer.fit` stopped: `max_steps=2` reached."]


@pytest.mark.parametrize("signum, said", [(signal.SIGTERM, "Detected SIGTERM"),
                                          (signal.SIGINT, "Detected KeyboardInterrupt")])
def test_lightning_shutdown_notice_names_the_signal_that_arrived(caplog, signum, said):
    """A SIGTERM reaches Lightning as the KeyboardInterrupt that interrupts_as_exceptions raises:
    its "Detected KeyboardInterrupt" notice then says SIGTERM (Ctrl-C keeps Lightning's words);
    outside an interrupted run the notice is left alone."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from deqlit.runs.guards import interrupts_as_exceptions
    notice = "\nDetected KeyboardInterrupt, attempting graceful shutdown ..."
    quiet_lightning_tips()
    with caplog.at_level(logging.INFO):
        with interrupts_as_exceptions():
            try:
                os.kill(os.getpid(), signum)       # the handler raises before the next line
                raise AssertionError("the signal did not interrupt")
            except KeyboardInterrupt:
                rank_zero_info(notice)     # what Lightning's trainer says in its graceful shutdown
        rank_zero_info(notice)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"\n{said}, attempting graceful shutdown ...", notice]


def test_lightning_leafspec_deprecation_is_dropped_and_other_warnings_kept():
    """Lightning's pytree helper makes torch's deprecated LeafSpec on every batch (torch >= 2.10):
    the entry point drops that FutureWarning only."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning_tips()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, "
                      "TreeSpec) and treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation"]


# ---- the real scripts -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "invert.py"])
def test_scripts_print_one_line_and_debug_the_traceback(tmp_path, script, monkeypatch):
    """The real scripts, as a user starts them (sample.py shares their cli.run_main wrapper and is
    checked in process by test_run_layer and test_sample_cli)."""
    argv = [sys.executable, script, "--inversoin.tau", "0.1", "--out", str(tmp_path / "o")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DEQLIT_DEBUG", None)
    plain = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2, plain.stderr[-1500:]
    assert "error: unknown config section 'inversoin'" in plain.stderr
    assert "Traceback" not in plain.stderr
    if script == "train.py":  # the wrapper is shared: one script shows the traceback switch
        # The script's own `__main__` block under DEQLIT_DEBUG=1, run in this process (a second
        # interpreter start cost 4 s): the error leaves the script, for the interpreter to print
        # its traceback and exit 1, instead of the one line and exit 2 above.
        import runpy
        from deqlit.config import UnknownSectionError
        monkeypatch.setenv("DEQLIT_DEBUG", "1")
        monkeypatch.setattr(sys, "argv", argv[1:])
        with pytest.raises(UnknownSectionError, match="inversoin"):
            runpy.run_path(str(REPO / script), run_name="__main__")


def test_the_resume_command_names_the_script_as_the_user_started_it(monkeypatch):
    """`python /somewhere/sample.py ...` run from elsewhere: the printed resume line must run there."""
    from deqlit.cli import resume_command, script_as_typed
    monkeypatch.setattr(sys, "argv", ["/opt/deqlit/sample.py", "--out", "x"])
    assert resume_command(script_as_typed("sample.py"), ["--out", "x"]) == "python /opt/deqlit/sample.py --out x --resume"
    monkeypatch.setattr(sys, "argv", ["pytest"])          # in-process (tests): the bare name
    assert script_as_typed("sample.py") == "sample.py"


def test_messages_name_the_first_few_items_then_an_ellipsis():
    from deqlit.guards import first_few
    assert first_few(range(3)) == "0, 1, 2"
    assert first_few(range(13)) == ", ".join(map(str, range(12))) + ", ..."
    assert first_few(["a", "b", "c"], 2) == "a, b, ..." and first_few([], 4) == ""
