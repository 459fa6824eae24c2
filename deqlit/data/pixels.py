"""One image file -> float32 (C, R, R) in [-1, 1], at the file's true bit depth.

8-bit files (PIL modes 1, L, LA, P, RGB, RGBA, CMYK, ...) take the path DDIM's torchvision
transform takes: PIL's bilinear resize (antialiased when shrinking) on the 8-bit image, then
x / 127.5 - 1, so the paper's preprocessing is reproduced exactly. Files of more than 8 bits
(16-bit grey PNG/TIFF, 32-bit integer and 32-bit float TIFF) are scaled to [0, 1] by their bit
depth and resized by the same PIL filter in float (mode 'F'), so no precision is lost to 8 bits.

Pillow itself reads 16-bit colour PNGs and TIFFs as 8-bit RGB (it keeps the high byte): they get
the right scale with 8-bit precision.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

GREY_8BIT = ("1", "L", "LA", "La")
COLOUR_8BIT = ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV")
GREY_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
READ_MODES = GREY_8BIT + COLOUR_8BIT + GREY_16BIT + ("I", "F")
FLOAT_SLACK = 1e-4  # float images may overshoot [0, 1] by rounding; clipped silently up to this

Box = tuple[int, int, int, int]


def open_image(path: Path) -> Image.Image:
    """Open and fully decode one image file in its own mode; ValueError naming the file if it
    cannot be read. The caller closes it (`with open_image(path) as image:`)."""
    try:
        image = Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}. Replace or delete the file.") from err
    try:
        image.load()  # decode now, so a truncated file fails here rather than later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        image.close()
        raise ValueError(f"cannot read image {path}: {err}. Replace or delete the file.") from err
    return image


def integer_depth(image: Image.Image, path: Path) -> tuple[int, bool]:
    """(bits per sample, signed) of a 16- or 32-bit integer grey image, from the file itself.

    Pillow opens 16-bit PNGs as 'I;16' (Pillow >= 10) or 'I' (older), and integer TIFFs of 16 or
    32 bits as 'I;16' or 'I'; the mode alone does not say whether the values span 0..65535 or the
    whole 32-bit range, so PNG's IHDR and TIFF's BitsPerSample / SampleFormat tags decide.
    """
    if image.format == "PNG":
        return 16, False  # 'I' from a PNG is always a 16-bit grey PNG (PNG has no 32-bit ints)
    if image.format == "TIFF":
        tags = image.tag_v2
        bits = tags.get(258, (16 if image.mode in GREY_16BIT else 32,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        sample_format = tags.get(339, 1)
        sample_format = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format)
        if sample_format not in (1, 2) or bits not in range(9, 33):
            raise ValueError(f"cannot read image {path}: TIFF with {bits}-bit samples of format "
                             f"{sample_format}; convert it to an 8- or 16-bit PNG or TIFF")
        return bits, sample_format == 2
    if image.mode in GREY_16BIT:
        return 16, False
    raise ValueError(f"cannot read image {path}: PIL mode {image.mode!r} from a {image.format} file "
                     "has no known bit depth; convert it to an 8- or 16-bit PNG or TIFF")


def high_depth_unit(image: Image.Image, path: Path) -> np.ndarray:
    """A grey image of more than 8 bits (modes I;16*, I, F) -> float64 (H, W) in [0, 1]."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"image {path} is 32-bit float with NaN or infinite pixels; "
                             "replace them with values in [0, 1]")
        low, high = float(values.min()), float(values.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise ValueError(f"image {path} is 32-bit float with values in [{low:g}, {high:g}]; "
                             "deqlit reads float images as intensities in [0, 1]: rescale it to "
                             "[0, 1] (or save it as an 8- or 16-bit image)")
        return values.clip(0.0, 1.0)
    bits, signed = integer_depth(image, path)
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I" and not signed and bits == 32:
        values &= 0xFFFFFFFF  # Pillow reads unsigned 32-bit TIFFs into int32: undo the wrap
    if signed and values.min() < 0:
        raise ValueError(f"image {path} is signed {bits}-bit with negative values (min "
                         f"{values.min()}); deqlit cannot know its intensity range: convert it "
                         "to an unsigned 8- or 16-bit image")
    full = (1 << (bits - 1 if signed else bits)) - 1
    if bits > 16 and values.max() <= 65535:
        warnings.warn(f"image {path}: its {bits}-bit integer values reach only {values.max()} of "
                      f"{full}, so it loads almost black; if it holds 16-bit data, save it as a "
                      "16-bit PNG or TIFF", UserWarning, stacklevel=2)
    return values / full


def decode_image(path: Path, resolution: int, box: Callable[[Image.Image], Box]
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
    """One file -> (float32 (C, resolution, resolution) in [-1, 1], (width, height) of the file).

    C is 1 for grey files and 3 for colour ones. `box(image)` gives the crop (left, top, right,
    bottom) taken before the bilinear resize to resolution x resolution.
    """
    with open_image(path) as image:  # format and TIFF tags are gone once it is closed
        return _decode_open(image, path, resolution, box), image.size


def _decode_open(image: Image.Image, path: Path, resolution: int,
                 box: Callable[[Image.Image], Box]) -> torch.Tensor:
    """decode_image's work on an open image."""
    mode = image.mode
    target = (resolution, resolution)
    resample = Image.Resampling.BILINEAR
    if mode in GREY_8BIT or mode in COLOUR_8BIT:
        try:
            image = image.convert("L" if mode in GREY_8BIT else "RGB")
        except ValueError as err:
            raise ValueError(f"cannot read image {path}: PIL mode {mode!r} does not convert to "
                             f"RGB ({err}); save it as RGB or greyscale") from err
        image = image.crop(box(image)).resize(target, resample)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        return pixels.float().div_(127.5).sub_(1.0)
    if mode in GREY_16BIT or mode in ("I", "F"):
        unit = Image.fromarray(high_depth_unit(image, path).astype(np.float32))
        unit = unit.crop(box(unit)).resize(target, resample)
        pixels = torch.from_numpy(np.asarray(unit, dtype=np.float32).copy())[None]
        return pixels.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)
    raise ValueError(f"cannot read image {path}: PIL mode {mode!r} is not supported (deqlit reads "
                     f"{', '.join(READ_MODES)}); save it as an 8- or 16-bit RGB or grey image")


def small_image_note(path: Path, size: tuple[int, int], crop_side: int, resolution: int
                     ) -> Optional[str]:
    """'path (WxH...)' when the cropped square is under half the model's side; else None."""
    if 2 * crop_side >= resolution:
        return None
    width, height = size
    note = f"{path} ({width}x{height}"
    if max(width, height) >= 4 * min(width, height):
        note += f", extreme aspect ratio: its center square is {crop_side}x{crop_side}"
    return note + ")"
