"""Every command in README's "What you can run" table runs, shrunk (tiny T, one or two images, one step),
so that a documented command cannot break again. Commands that need data or checkpoints this
machine does not have must fail with the clear "never downloads" message, exit 2."""
from __future__ import annotations

import os
import re
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from deqlit.cli import run_main

REPO = Path(__file__).resolve().parent.parent
SHRINK = {
    "invert.py": ["--num-images", "2", "--batch-size", "2", "--max-steps", "1", "--timesteps", "3",
                  "--inversion.max_iter", "3", "--no-progress"],
    "sample.py": ["--num-images", "1", "--timesteps", "3", "--max-iter", "3", "--no-progress"],
    "train.py": ["--max-steps", "1", "--train.sample_every", "0", "--batch-size", "2"],
}
NEEDS_FILES = ("celeba", "cifar10", "lsun")     # data/checkpoints no test machine has


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    table = text.split("## What you can run", 1)[1].split("\n\n", 2)[1]
    return re.findall(r"^\| `(python [^`]+)`", table, flags=re.M)


def test_readme_lists_commands_of_every_script():
    scripts = {shlex.split(c)[1] for c in readme_commands()}
    assert scripts == {"invert.py", "sample.py", "train.py"}


def main_of(script: str):
    if script == "invert.py":
        from deqlit.commands.invert import main
    elif script == "sample.py":
        from deqlit.commands.sample import main
    else:
        import importlib.util
        spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = module.main
    return main


def shrunk(command: str, tmp: Path, runs: dict[str, Path], index: int) -> tuple[str, list[str]]:
    """(script, argv) of the index-th command with the shrinking flags, an --out in tmp (tmp/run{index}
    unless it resumes an earlier run), and paths of earlier runs."""
    words = shlex.split(command)[1:]
    script, argv = words[0], words[1:]
    earlier = {"runs/invert-faces/latents.pt": runs.get("invert.py", Path()) / "latents.pt",
               "runs/invert-faces": runs.get("invert.py", Path())}     # a file or its run folder
    argv = [str(earlier[a]) if a in earlier else a for a in argv]
    extra = list(SHRINK[script])
    if script == "invert.py":        # invert.py refuses flags its method would not read
        extra = invert_shrink(argv, extra)
    if "--metrics" in argv:          # distances between distributions need 2 images at least
        extra[extra.index("--num-images") + 1] = "2"
    if "--trainer.devices" in argv:  # one image per process at least
        extra[extra.index("--num-images") + 1] = argv[argv.index("--trainer.devices") + 1]
    if "--latents" in argv or "--interpolate" in argv:          # the saved chain decides T
        at = extra.index("--timesteps")
        del extra[at:at + 2]
    if "--interpolate" in argv:      # the shrunk inversion saved 2 latents; the morphs take every pair given
        argv[argv.index("--pairs") + 1] = "0:1"
        at = extra.index("--num-images")
        del extra[at:at + 2]
    if "--task" in argv and "joint" in argv:
        extra = ["--max-steps", "1", "--joint.num_images", "1", "--joint.timesteps", "3",
                 "--joint.kid_every", "0", "--joint.compare_every", "0", "--joint.image_every", "0",
                 "--joint.reference_images", "2", "--joint.prior_batch_size", "2"]
    if "--resume" in argv:
        out = runs[script]
        if script == "train.py":
            extra[extra.index("--max-steps") + 1] = "2"      # train on past the saved step
    else:
        out = tmp / f"run{index}"
    runs.setdefault(script, out)
    return script, argv + extra + ["--out", str(out)]


def invert_shrink(argv: list[str], extra: list[str]) -> list[str]:
    """SHRINK's invert.py flags that the command's method reads: --max-steps not for exact (faces.yaml's
    method where neither --method nor --task says otherwise), the DEQ solver's max_iter for deq only."""
    method = argv[argv.index("--method") + 1] if "--method" in argv else "deq" if "--task" in argv else "exact"
    dropped = {"exact": ("--max-steps", "--inversion.max_iter"), "baseline": ("--inversion.max_iter",)}
    for flag in dropped.get(method, ()):
        at = extra.index(flag)
        del extra[at:at + 2]
    return extra


@pytest.mark.slow
def test_every_readme_command_runs_shrunk(tmp_path, monkeypatch, capsys, one_thread):
    """The commands of several processes start first, as subprocesses (Lightning re-runs the
    script); the others run in this process, on one thread, while they do, in the README's order
    (a command may use an earlier one's run)."""
    from tests.processes import Command
    monkeypatch.chdir(tmp_path)                     # data/ and runs/ of the defaults live here
    runs: dict[str, Path] = {}
    work = tmp_path / "outs"
    work.mkdir()
    planned = [(command, *shrunk(command, work, runs, index)) for index, command in enumerate(readme_commands())]
    with ExitStack() as started:
        several = {index: started.enter_context(Command(
                       [sys.executable, str(REPO / script), *argv], tmp_path, f"command{index}", timeout_s=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}))
                   for index, (_, script, argv) in enumerate(planned) if "--trainer.devices" in argv}
        for index, (command, script, argv) in enumerate(planned):
            if index in several:
                continue
            with pytest.raises(SystemExit) as stop:
                run_main(main_of(script), argv, script=script)
                raise SystemExit(0)
            err = capsys.readouterr().err
            if any(name in command for name in NEEDS_FILES) or "digits" in command and script != "train.py":
                assert stop.value.code == 2 and ("never downloads" in err or "not found" in err), (command, err)
            else:
                assert stop.value.code == 0, (command, err[-2000:])
        for index, process in several.items():
            command, script, argv = planned[index]
            done = process.result()
            assert done.returncode == 0, (command, done.stderr[-2000:])
            if script == "invert.py" and "ddp" in argv:    # data-parallel: the latents of one process
                out = Path(argv[len(argv) - argv[::-1].index("--out")])   # the last --out wins: the test's
                one = torch.load(runs["invert.py"] / "latents.pt", weights_only=True)
                two = torch.load(out / "latents.pt", weights_only=True)
                assert one["indices"].tolist() == two["indices"].tolist() == [0, 1]
                # float32: one image per process convolves in other batch sizes than two in one
                # process (~1e-7); the exact solve stops on its relative tol (1e-4), so a step may stop
                # one iteration earlier or later: up to ~tol x |x_T| (|x_T| <= ~3), 2e-4 measured on
                # this CPU at 45ee3db and after (1e-5 on CI's)
                assert (one["x_T"] - two["x_T"]).abs().max() <= 1e-3
    assert several, "no README command of several processes"
