"""invert.py as a new user meets it, the command line run in this process on the tiny setup (and
--print_config on faces.yaml): what it refuses before writing anything, where it writes, what its
summary says."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from deqlit.commands.invert import main
from tests.tiny import tiny_setup


def invert(config: Path, *extra: str) -> dict:
    return main(["--config", str(config), "--no-progress", "--num-images", "2", *extra])


def exact_config(tmp_path: Path) -> Path:
    """The tiny setup with faces.yaml's method (exact) and start."""
    path = tiny_setup(tmp_path, n_images=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["inversion"].update(method="exact", init="ddim-inversion", max_steps=2)
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def test_a_mask_of_another_size_and_the_same_shape_is_resized_with_a_note(tmp_path, capsys):
    config = exact_config(tmp_path)
    big = mask_file(tmp_path / "big.png", (16, 16), (4, 4, 12, 12))     # the centre 8x8 of 16x16
    invert(config, "--task", "inpaint", "--mask", str(big), "--max-steps", "1", "--out", str(tmp_path / "o"))
    assert f"note: mask file {big} is 16x16 pixels: resized to the images' 8x8" in capsys.readouterr().out
    hidden = torch.load(tmp_path / "o" / "latents.pt", weights_only=True)["unknown"][0, 0]
    assert torch.equal(hidden.nonzero().min(0).values, torch.tensor([2, 2]))
    assert torch.equal(hidden.nonzero().max(0).values, torch.tensor([5, 5])) and int(hidden.sum()) == 16


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
