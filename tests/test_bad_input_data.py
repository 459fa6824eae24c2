"""Bad or unusual input data (issue 8, items 2 and 7): every bit depth scales to [-1, 1], odd
files are named, tiny images and short splits warn, and `--data digits` works end to end.

Images are written to tmp_path with the values each test asserts; the oracle is the file's own
integer value divided by its bit depth's maximum, computed here with numpy.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deqlit.data.folders import image_files, load_local_dataset
from deqlit.data.pixels import decode_image, integer_depth
from deqlit.data.registry import load_images

REPO = Path(__file__).resolve().parent.parent
GRADIENT = np.linspace(0, 65535, 64).round().astype(np.uint16)  # one row, 0 .. 65535


def load_one(path: Path, resolution: int = 64, channels: int = 1) -> torch.Tensor:
    """The single image of `path`'s folder, (channels, resolution, resolution)."""
    return load_local_dataset(f"folder:{path.parent}", "all", resolution, channels)[0]


def gradient_rows(values: np.ndarray) -> np.ndarray:
    """A 64x64 image whose every row is `values` (64,)."""
    return np.repeat(values[None], 64, axis=0)


def assert_gradient(image: torch.Tensor) -> None:
    """A 0..max gradient loads as -1..1 at both ends, monotone along each row."""
    row = image[0, 0]
    assert abs(row[0].item() + 1) < 1e-3 and abs(row[-1].item() - 1) < 1e-3
    assert (row[1:] - row[:-1] > 0).all()
    expected = torch.from_numpy(GRADIENT / 65535.0 * 2 - 1).float()
    assert torch.allclose(row, expected, atol=1e-5)  # 16-bit precision: no 8-bit step (7.8e-3)


# --- 16-bit, 32-bit and float images ---------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_gradient_loads_as_minus_one_to_one(tmp_path, suffix):
    path = tmp_path / f"gradient{suffix}"
    Image.fromarray(gradient_rows(GRADIENT)).save(path)
    assert Image.open(path).mode.startswith("I")  # I;16 on Pillow >= 10, I before
    image = load_one(path)
    assert image.shape == (1, 64, 64)
    assert_gradient(image)
    rgb = load_one(path, channels=3)
    assert torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[:1], image)


def test_16_bit_big_endian_tiff_and_precision_below_8_bits(tmp_path):
    data = gradient_rows(GRADIENT).astype(">u2")
    Image.frombytes("I;16B", (64, 64), data.tobytes()).save(tmp_path / "big.tif")
    assert_gradient(load_one(tmp_path / "big.tif"))
    # Two flat images one 16-bit level apart load differently (an 8-bit path gives them the same).
    for name, value in (("a", 30000), ("b", 30001)):
        Image.fromarray(np.full((40, 40), value, np.uint16)).save(tmp_path / f"{name}.png")
    a = decode_image(tmp_path / "a.png", 16, lambda im: (0, 0, 40, 40))[0]
    b = decode_image(tmp_path / "b.png", 16, lambda im: (0, 0, 40, 40))[0]
    assert torch.allclose(a, torch.full_like(a, 30000 / 65535 * 2 - 1), atol=1e-6)
    assert torch.allclose(b - a, torch.full_like(a, 2 / 65535), atol=1e-6)


def test_16_bit_resize_is_pil_bilinear_in_float(tmp_path):
    """Shrinking 64 -> 16 equals PIL's bilinear filter applied to the float image: the oracle."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (64, 64)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "noise.png")
    oracle = Image.fromarray((values / 65535.0).astype(np.float32)).resize(
        (16, 16), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.array(oracle)).mul(2).sub(1)
    assert torch.allclose(load_one(tmp_path / "noise.png", 16)[0], expected, atol=1e-6)


def test_32_bit_integer_tiff_scales_by_its_bit_depth(tmp_path):
    full = np.linspace(0, 2**31 - 1, 64).round().astype(np.int32)  # Pillow writes signed int32
    Image.fromarray(gradient_rows(full)).save(tmp_path / "i32.tif")
    row = load_one(tmp_path / "i32.tif")[0, 0]
    assert abs(row[0] + 1) < 1e-3 and abs(row[-1] - 1) < 1e-3 and (row[1:] > row[:-1]).all()


def test_unsigned_32_bit_tiff_is_not_wrapped(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    values = np.linspace(0, 2**32 - 1, 64).round().astype(np.uint32)  # Pillow reads it as int32
    tifffile.imwrite(tmp_path / "u32.tif", gradient_rows(values))
    row = load_one(tmp_path / "u32.tif")[0, 0]
    assert abs(row[0] + 1) < 1e-3 and abs(row[-1] - 1) < 1e-3 and (row[1:] > row[:-1]).all()


def test_16_bit_data_in_32_bits_warns(tmp_path):
    Image.fromarray(gradient_rows(GRADIENT.astype(np.int32))).save(tmp_path / "small.tif")
    with pytest.warns(UserWarning, match=r"small\.tif.*reach only 65535.*16-bit PNG or TIFF"):
        image = load_one(tmp_path / "small.tif")
    assert image.max() < -0.99  # scaled by the true 32-bit depth, as the warning says


def test_negative_signed_integers_are_refused(tmp_path):
    values = np.linspace(-1000, 1000, 64).astype(np.int32)
    Image.fromarray(gradient_rows(values)).save(tmp_path / "signed.tif")
    with pytest.raises(ValueError, match=r"signed\.tif.*negative values"):
        load_one(tmp_path / "signed.tif")


def test_mode_i_from_a_png_is_16_bit(tmp_path):
    """Pillow < 10 opens 16-bit PNGs as mode 'I': the PNG format alone fixes 16 bits."""
    image = Image.fromarray(GRADIENT.astype(np.int32)[None])
    image.format = "PNG"
    assert integer_depth(image, tmp_path / "x.png") == (16, False)
    image.format = "PPM"
    with pytest.raises(ValueError, match=r"x\.png.*'I'.*no known bit depth"):
        integer_depth(image, tmp_path / "x.png")


def test_float_images_in_unit_range_and_out_of_it(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32)
    Image.fromarray(gradient_rows(values)).save(tmp_path / "unit.tif")
    row = load_one(tmp_path / "unit.tif")[0, 0]
    assert torch.allclose(row, torch.from_numpy(values * 2 - 1), atol=1e-6)
    Image.fromarray(gradient_rows(values * 255)).save(tmp_path / "unit.tif")
    with pytest.raises(ValueError, match=r"unit\.tif.*float.*\[0, 255\].*rescale it to \[0, 1\]"):
        load_one(tmp_path / "unit.tif")
    values[3] = np.nan
    Image.fromarray(gradient_rows(values)).save(tmp_path / "unit.tif")
    with pytest.raises(ValueError, match=r"unit\.tif.*NaN"):
        load_one(tmp_path / "unit.tif")


# --- 8-bit modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])
def test_8_bit_modes_scale_exactly(tmp_path, mode):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (255, 0, 51) if mode in ("P", "RGB", "RGBA") else (255, 255, 255)
    image = Image.fromarray(rgb)
    image = image.quantize(4) if mode == "P" else image.convert(mode)
    image.save(tmp_path / "img.png")
    loaded = load_one(tmp_path / "img.png", 32, 3)
    left = loaded[:, :, :16].flatten(1)
    right = loaded[:, :, 16:].flatten(1)
    expected = torch.tensor([255.0, 0, 51] if mode in ("P", "RGB", "RGBA") else [255.0] * 3)
    assert torch.equal(left, (expected / 127.5 - 1)[:, None].expand_as(left))
    assert torch.equal(right, torch.full_like(right, -1))
    grey = load_one(tmp_path / "img.png", 32, 1)
    assert torch.allclose(grey[0], loaded.mean(dim=0), atol=1e-6)  # grey = mean of the channels


def test_unsupported_mode_is_refused_naming_file_and_mode(tmp_path):
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    with pytest.raises(ValueError, match=r"lab\.tif.*mode 'LAB' is not supported"):
        load_one(tmp_path / "lab.tif")


# --- files, sizes and counts -------------------------------------------------------------------

def test_tiff_is_read_and_other_files_are_skipped_with_one_warning(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / "a.tif")
    Image.new("L", (32, 32), 99).save(folder / "b.tiff")
    for name in ("notes.txt", "more.txt", "anim.gif", "README"):
        (folder / name).write_text("x")
    with pytest.warns(UserWarning) as caught:
        assert [p.name for p in image_files(folder)] == ["a.tif", "b.tiff"]
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1
    assert "skipped 4 file(s)" in messages[0]
    assert "2 .txt" in messages[0] and "1 .gif" in messages[0] and "(no suffix)" in messages[0]
    with pytest.warns(UserWarning, match="skipped 4"):
        images = load_local_dataset(f"folder:{folder}", "all", 32, 3)
    assert torch.allclose(images[0, :, 0, 0], torch.tensor([10.0, 20, 30]) / 127.5 - 1)
    assert torch.allclose(images[1], torch.full((3, 32, 32), 99 / 127.5 - 1))


def test_no_warning_for_a_clean_folder_of_large_images(tmp_path):
    for k in range(3):
        Image.new("RGB", (40 + k, 30), (k, k, k)).save(tmp_path / f"{k}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_local_dataset(f"folder:{tmp_path}", "all", 32, 3).shape == (3, 3, 32, 32)


def test_tiny_and_extreme_aspect_images_warn(tmp_path):
    Image.new("L", (1, 1), 200).save(tmp_path / "dot.png")
    Image.new("L", (500, 1), 200).save(tmp_path / "line.png")
    Image.new("L", (64, 64), 200).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="far smaller") as caught:
        load_local_dataset(f"folder:{tmp_path}", "all", 32, 1)
    message = next(str(w.message) for w in caught if "far smaller" in str(w.message))
    assert message.startswith("2 image(s)") and "32x32" in message
    assert "dot.png (1x1)" in message
    assert "line.png (500x1, extreme aspect ratio: its center square is 1x1)" in message
    assert "fine.png" not in message


def test_fewer_images_than_asked_warns(tmp_path):
    with pytest.warns(UserWarning, match="asked for 20 images but split 'test' of 'faces' holds "
                                         "16; using 16"):
        assert load_images("faces", "test", 32, 1, limit=20).shape[0] == 16
    for k in range(3):
        Image.new("L", (32, 32), k).save(tmp_path / f"{k}.png")
    with pytest.warns(UserWarning, match="asked for 16 images but split 'all' .* holds 3"):
        assert load_images(f"folder:{tmp_path}", "all", 32, 1, limit=16).shape[0] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_images(f"folder:{tmp_path}", "all", 32, 1, limit=3)


# --- --data digits ------------------------------------------------------------------------------

def digits_config() -> dict:
    from deqlit.config import find_config, load_config
    return load_config(find_config("digits"))


def test_digits_config_builds_its_model_and_data():
    from deqlit.models.unet import DDIMUNet
    cfg = digits_config()
    data, model_cfg = cfg["data"], cfg["model"]
    assert data["name"] == "digits" and cfg["train"]["hflip"] is False  # a mirrored 7 is no 7
    assert (model_cfg["resolution"], model_cfg["in_channels"]) == (data["resolution"],
                                                                    data["channels"])
    model = DDIMUNet(**model_cfg)
    images = load_images("digits", "test", data["resolution"], data["channels"], limit=2)
    out = model(images, torch.tensor([10, 900]))
    assert out.shape == images.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


def test_digits_missing_checkpoint_says_how_to_make_it(tmp_path):
    from deqlit.runs.inversion import MissingInputsError, check_inputs
    cfg = digits_config()
    assert cfg["checkpoint"]["path"] == "runs/train-digits/ema.pt" == cfg["train"]["out"] + "/ema.pt"
    with pytest.raises(MissingInputsError, match=r"(?s)missing\.pt does not exist.*"
                                                 r"python train\.py --data digits"):
        check_inputs(cfg, str(tmp_path / "missing.pt"))


def test_data_contradicting_the_config_is_refused():
    from deqlit.cli import parse
    with pytest.raises(ValueError, match="--data digits contradicts --config .*faces.yaml.*'faces'"):
        parse(argparse.ArgumentParser(), ["--data", "digits", "--config",
                                          str(REPO / "configs" / "faces.yaml")], {})
    args, cfg = parse(argparse.ArgumentParser(), ["--data", "faces", "--config",
                                                  str(REPO / "configs" / "faces.yaml")], {})
    assert cfg["data"]["name"] == "faces"
    _, cfg = parse(argparse.ArgumentParser(), ["--data", "folder:/x", "--config",
                                               str(REPO / "configs" / "digits.yaml")], {})
    assert cfg["data"]["name"] == "folder:/x" and cfg["model"]["resolution"] == 16


@pytest.mark.slow
def test_digits_trains_five_steps_and_samples(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore",
           "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "train.py", "--data", "digits", "--max-steps", "5",
                          "--batch-size", "8", "--out", str(tmp_path / "train"),
                          "--train.checkpoint_every", "5", "--train.sample_every", "1000"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ema = tmp_path / "train" / "ema.pt"
    assert ema.is_file()
    from deqlit.commands.sample import main as sample_main      # in this process: one start less
    sample_main(["--data", "digits", "--ckpt", str(ema), "--num-images", "2", "--timesteps", "3",
                 "--no-progress", "--out", str(tmp_path / "s")])
    samples = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    samples = samples if torch.is_tensor(samples) else next(iter(samples.values()))
    assert samples.shape[-3:] == (1, 16, 16) and torch.isfinite(samples).all()
