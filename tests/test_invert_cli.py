"""invert.py as a new user meets it, the command line run in this process on the tiny setup (and
--print_config on faces.yaml): what it refuses before writing anything, where it writes, what its
summary says."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from deqlit.commands.invert import main
from deqlit.guards import UserInputError
from tests.tiny import exact_config


def invert(config: Path, *extra: str) -> dict:
    return main(["--config", str(config), "--no-progress", "--num-images", "2", *extra])




# ---- a mask file is checked before anything is written; a failed start is undone

def mask_file(path: Path, size: tuple[int, int], black: tuple[int, int, int, int] | None) -> Path:
    """A PNG of `size` (width, height), white with a black box (left, top, right, bottom)."""
    image = Image.new("L", size, 255)
    if black is not None:
        image.paste(0, black)
    image.save(path)
    return path


def test_a_bad_mask_file_is_refused_before_the_folder_is_touched(tmp_path):
    config = exact_config(tmp_path)
    out = tmp_path / "masked"
    bad = {tmp_path / "missing.png": (FileNotFoundError, "does not exist"),
           mask_file(tmp_path / "white.png", (8, 8), None): (ValueError, "every pixel as known"),
           mask_file(tmp_path / "black.png", (8, 8), (0, 0, 8, 8)): (ValueError, "marks no pixel as known"),
           mask_file(tmp_path / "wide.png", (16, 8), (4, 2, 12, 6)):
               (ValueError, r"is 16x8 pixels but the images are 8x8.*aspect ratio")}
    for path, (error, words) in bad.items():
        with pytest.raises(error, match=words):
            invert(config, "--task", "inpaint", "--mask", str(path), "--out", str(out))
        assert not out.exists(), path
    invert(config, "--task", "inpaint", "--mask", "center", "--max-steps", "1", "--out", str(out))


def test_a_random_mask_that_hides_no_pixel_or_every_pixel_is_refused_before_the_folder_is_touched(tmp_path):
    """Before: random:0.001 on 8x8 images ran, and its hole scores were NaN (written to metrics.json
    as NaN, which strict JSON readers refuse); random:0.999 left nothing to restore from."""
    config = exact_config(tmp_path)
    out = tmp_path / "masked"
    for mask, words in (("random:0.001", r"hides no pixel of 2 of the 2 images \(dataset indices 0, 1;"),
                        ("random:0.999", r"hides every pixel of 2 of the 2 images .*nothing to restore them from")):
        with pytest.raises(ValueError, match=words):
            invert(config, "--task", "inpaint", "--mask", mask, "--out", str(out))
        assert not out.exists(), mask
    invert(config, "--task", "inpaint", "--mask", "random:0.5", "--max-steps", "1", "--out", str(out))


def test_a_mask_of_another_size_and_the_same_shape_is_resized_with_a_note(tmp_path, capsys):
    config = exact_config(tmp_path)
    big = mask_file(tmp_path / "big.png", (16, 16), (4, 4, 12, 12))     # the centre 8x8 of 16x16
    invert(config, "--task", "inpaint", "--mask", str(big), "--max-steps", "1", "--out", str(tmp_path / "o"))
    assert f"note: mask file {big} is 16x16 pixels: resized to the images' 8x8" in capsys.readouterr().out
    hidden = torch.load(tmp_path / "o" / "latents.pt", weights_only=True)["unknown"][0, 0]
    assert torch.equal(hidden.nonzero().min(0).values, torch.tensor([2, 2]))
    assert torch.equal(hidden.nonzero().max(0).values, torch.tensor([5, 5])) and int(hidden.sum()) == 16


def test_a_mask_file_edited_before_resume_is_refused(tmp_path):
    """run.json recorded the mask file's path only: a file painted again between Ctrl-C and --resume
    gave the resumed images another mask than the finished ones, under the same name. The same
    pixels saved again (another size of the same shape) still resume."""
    config = exact_config(tmp_path)
    mask = mask_file(tmp_path / "mask.png", (8, 8), (2, 2, 6, 6))
    out = tmp_path / "o"
    args = ("--task", "inpaint", "--mask", str(mask), "--max-steps", "1", "--batch-size", "1", "--out", str(out))
    invert(config, *args)
    (out / "latents" / "part-00000001.pt").unlink()           # as if stopped before the second image
    mask_file(mask, (16, 16), (4, 4, 12, 12))                 # the same pixels at twice the size
    assert invert(config, *args, "--resume")["num_images"] == 2
    (out / "latents" / "part-00000001.pt").unlink()
    mask_file(mask, (8, 8), (0, 4, 8, 8))                     # another hole
    with pytest.raises(UserInputError, match=r"cannot resume with changed settings: mask_file_pixels"):
        invert(config, *args, "--resume")


def test_a_mask_file_painted_over_during_the_run_is_refused_at_the_next_batch(tmp_path, monkeypatch):
    """Each batch reads the mask file again: one painted over between batches would have given the
    later images another mask under the same name. The run stops naming the file; the finished
    batch is kept, and with the first mask back --resume finishes the run."""
    import deqlit.lit.inversion_module as inversion_module
    config = exact_config(tmp_path)
    mask = mask_file(tmp_path / "mask.png", (8, 8), (2, 2, 6, 6))
    out = tmp_path / "o"
    args = ("--task", "inpaint", "--mask", str(mask), "--max-steps", "1", "--batch-size", "1", "--out", str(out))
    real, made = inversion_module.BatchInverter, []

    def painting_over(*a, **k):
        if made:                                            # between the first batch and the second
            mask_file(mask, (8, 8), (0, 4, 8, 8))
        made.append(1)
        return real(*a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(inversion_module, "BatchInverter", painting_over)
        with pytest.raises(UserInputError, match=r"mask file .*mask.png changed during the run"):
            invert(config, *args)
    assert sorted(p.name for p in (out / "latents").glob("part-*.pt")) == ["part-00000000.pt"]
    mask_file(mask, (8, 8), (2, 2, 6, 6))
    assert invert(config, *args, "--resume")["num_images"] == 2


def test_a_run_that_fails_before_its_first_result_leaves_no_folder(tmp_path, monkeypatch):
    """Any error in the first batch (here a stand-in for one) undoes run.json, config.yaml and tb/:
    the rerun is not refused as "an earlier inversion"."""
    import deqlit.deq.inversion as inversion
    config = exact_config(tmp_path)
    out = tmp_path / "failed"

    def broken(*args, **kwargs):
        raise ValueError("a stand-in for an error in the first batch")
    with monkeypatch.context() as patch:
        patch.setattr(inversion, "make_degradation", broken)
        with pytest.raises(ValueError, match="stand-in"):
            invert(config, "--out", str(out))
    assert not out.exists()
    assert invert(config, "--out", str(out))["num_images"] == 2


# ---- flags that would do nothing are refused; metrics record only what was used

@pytest.mark.parametrize("argv, words", [
    (["--task", "reconstruct", "--mask", "random:0.3"], r"--mask applies to --task inpaint"),
    (["--task", "inpaint", "--factor", "4"], r"--factor applies to --task super-resolution"),
    (["--fill", "harmonic"], r"--fill applies to --task inpaint"),
    (["--method", "exact", "--lr", "0.5", "--max-steps", "3"],
     r"--lr and --max-steps apply to --method deq or baseline"),
    (["--inversion.lr", "0.5"], r"--inversion.lr applies to --method deq or baseline"),
    (["--method", "exact", "--init", "random"], r"--init applies to --method deq or baseline"),
    (["--method", "baseline", "--solver", "anderson"], r"--solver applies to --method deq"),
    (["--method", "deq", "--inversion.exact.max_iter", "5"], r"--inversion.exact.max_iter applies to --method exact or --init exact"),
])
def test_a_flag_the_run_would_ignore_is_refused(tmp_path, argv, words):
    config = exact_config(tmp_path)
    with pytest.raises(UserInputError, match=r"would do nothing in this run .*" + words):
        invert(config, *argv, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_config_values_are_defaults_and_metrics_record_only_the_tasks_options(tmp_path):
    """The tiny config sets lr, max_steps, mask, factor and fill for a method-exact reconstruction:
    not refused (the user typed none of them), and not recorded as if used."""
    config = exact_config(tmp_path)
    settings = invert(config, "--out", str(tmp_path / "rec"))["settings"]
    assert not {"mask", "factor", "fill"} & set(settings)
    settings = invert(config, "--task", "inpaint", "--max-steps", "1", "--out", str(tmp_path / "inp"))["settings"]
    assert settings["mask"] == "center" and settings["fill"] == "mean" and "factor" not in settings
    saved = json.loads((tmp_path / "inp" / "run.json").read_text())["settings"]
    assert "factor" not in saved and saved["mask"] == "center"


def test_a_run_json_that_recorded_other_tasks_options_still_resumes(tmp_path):
    """Earlier versions recorded a reconstruction's mask, factor and fill; a resume of such a run
    must not see them as changed settings."""
    config = exact_config(tmp_path)
    invert(config)
    run_file = tmp_path / "run" / "run.json"
    saved = json.loads(run_file.read_text())
    saved["settings"].update(mask="center", factor=2, fill="mean")
    run_file.write_text(json.dumps(saved))
    assert invert(config, "--resume")["num_images"] == 2


# ---- a default folder per kind of run

def printed_config(argv: list[str], capsys) -> dict:
    """The resolved config `python invert.py ARGV --print_config` prints."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_the_readme_commands_get_distinct_default_folders(capsys):
    """faces.yaml's inversion.out is runs/invert-faces; the task (with its mask or factor), the
    method and the start given on the command line are added to it; --out is kept as given."""
    expected = {(): "runs/invert-faces",
                ("--init", "random", "--method", "deq"): "runs/invert-faces-deq-gaussian",
                ("--method", "baseline", "--timesteps", "100"): "runs/invert-faces-baseline",
                ("--task", "inpaint", "--mask", "center"): "runs/invert-faces-inpaint-center",
                ("--task", "inpaint", "--mask", "random:0.5"): "runs/invert-faces-inpaint-random0.5",
                ("--task", "inpaint", "--fill", "harmonic"): "runs/invert-faces-inpaint-center-harmonic",
                ("--task", "super-resolution", "--factor", "2"): "runs/invert-faces-super-resolution-x2",
                ("--task", "inpaint", "--out", "mine"): "mine",
                ("--task", "inpaint", "--inversion.out", "theirs"): "theirs"}
    for argv, folder in expected.items():
        assert printed_config(list(argv), capsys)["inversion"]["out"] == folder, argv


def test_a_restoration_after_the_quickstart_runs_in_its_own_folder(tmp_path, capsys):
    """Before: the second command was refused ("holds an earlier inversion: add --resume") and
    --resume then refused the changed settings."""
    config = exact_config(tmp_path)              # inversion.out: tmp_path/run
    invert(config)
    metrics = invert(config, "--task", "inpaint", "--max-steps", "1")
    said = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'run'}-inpaint-center" in said
    assert metrics["settings"]["task"] == "inpaint"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]["method"] == "exact"
    assert (tmp_path / "run-inpaint-center" / "metrics.json").is_file()


def test_a_reused_folder_and_a_changed_resume_suggest_a_new_folder(tmp_path):
    config = exact_config(tmp_path)
    invert(config)
    with pytest.raises(UserInputError, match=r"add --resume to continue it, or --out NEW_FOLDER for a new run"):
        invert(config)
    with pytest.raises(UserInputError, match=r"cannot resume with changed settings: .*timesteps.*"
                                             r"or --out NEW_FOLDER for a new run"):
        invert(config, "--timesteps", "3", "--resume")


# ---- how many steps ran

def test_the_summary_says_how_many_steps_ran_and_why_none(tmp_path, capsys):
    """An image whose start is under its early-stop threshold takes no step, and the summary says
    so (before: the note promised 5 steps and every image took 1, silently)."""
    config = exact_config(tmp_path)
    invert(config, "--task", "super-resolution", "--num-images", "1", "--inversion.early_stop_loss", "1e6",
           "--out", str(tmp_path / "stop"))
    said = capsys.readouterr().out
    assert "Adam steps per image: 0 (--max-steps 2)" in said
    assert "1 of 1 image took none: the start's loss was already under early_stop_loss 1e+06 x the share" in said
    metrics = invert(config, "--task", "super-resolution", "--max-steps", "2", "--inversion.early_stop_loss", "0",
                     "--out", str(tmp_path / "all"))
    assert [m["steps"] for m in metrics["images"]] == [2, 2] and "took none" not in capsys.readouterr().out


# ---- exact inversion that misses tol; the singular

def test_exact_inversion_that_misses_tol_is_named_once_with_the_flags_that_help(tmp_path, capsys):
    config = exact_config(tmp_path)
    with no_warning_about_convergence():
        invert(config, "--inversion.exact.max_iter", "1", "--inversion.exact.tol", "1e-12",
               "--out", str(tmp_path / "o"))
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "did not converge for 2 of 2 images (dataset indices 0, 1)" in lines[0]
    assert "--timesteps 8" in lines[0] and "--inversion.exact.max_iter" in lines[0]
    assert "solver='anderson'" not in captured.out + captured.err and "batch positions" not in captured.err
    assert "inverted 2 images with exact" in captured.out and "2 of 2 did not converge" in captured.out


@contextlib.contextmanager
def no_warning_about_convergence():
    """Before, a raw UserWarning (with its source line) said it, inside the progress bar."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    assert not [w for w in seen if "converge" in str(w.message)]


def test_the_summary_counts_one_image_in_the_singular(tmp_path, capsys):
    config = exact_config(tmp_path)
    invert(config, "--num-images", "1", "--out", str(tmp_path / "o"))
    assert "inverted 1 image with exact" in capsys.readouterr().out
    invert(config, "--task", "inpaint", "--num-images", "1", "--max-steps", "1", "--out", str(tmp_path / "r"))
    assert "restored 1 image with deq" in capsys.readouterr().out


def test_latents_thrown_out_of_range_by_adam_name_the_learning_rate_and_leave_nothing(tmp_path, capsys):
    """--lr 1e30: after one Adam step the latents are ~1e30 and the network returns NaN on them.
    The error names the step and --lr (not the checkpoint's weights, the solver's guess for NaN
    from sane inputs), and the run, which finished nothing, leaves no folder to refuse a rerun."""
    from tests.test_run_layer import run
    out = tmp_path / "diverged"
    code, _, err = run("invert", ["--method", "deq", "--lr", "1e30", "--num-images", "1", "--timesteps", "3",
                                  "--max-steps", "4", "--out", str(out), "--no-progress"], capsys)
    assert code == 1
    assert "diverged at step 1" in err and "--lr, now 1e+30" in err and "checkpoint" not in err
    assert not out.exists()
