"""Datasets read from the user's disk: cifar10, celeba, lsun-bedroom, lsun-church, folder:PATH.

deqlit never downloads anything: each set must already sit under the data root (config key
`data.root`, default `data/`) in the layout that `expected_layout` prints and data/README.md shows.
Every loader returns float32 (N, channels, resolution, resolution) in [-1, 1] and, given `limit`,
decodes only the first `limit` images of the split, so inverting 16 images never reads 200k.
"""
from __future__ import annotations

import errno
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from deqlit.data.faces import resize, to_channels
from deqlit.data.pixels import decode_image, small_image_note

KNOWN_NAMES = ("faces", "digits", "cifar10", "celeba", "lsun-bedroom", "lsun-church", "folder:PATH")
BUNDLED = ("faces", "digits")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
FOLDER_TEST_EVERY = 10  # folders: sorted file i is 'test' when i % 10 == 0, else 'train'

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_BATCHES["all"] = CIFAR_BATCHES["train"] + CIFAR_BATCHES["test"]

# DDIM's CelebA transform (ermongroup/ddim datasets/__init__.py, checked against a stored copy of
# that file): cx, cy = 89, 121 and F.crop(img, top=cy-64, left=cx-64, height=128, width=128) on
# the 178x218 aligned images, then Resize(image_size). As a PIL box (left, upper, right, lower):
CELEBA_SIZE = (178, 218)  # (width, height) of every img_align_celeba image
CELEBA_CROP_BOX = (89 - 64, 121 - 64, 89 + 64, 121 + 64)
CELEBA_PARTITIONS = {"train": {0}, "valid": {1}, "test": {2}, "all": {0, 1, 2}}

_SOURCES = {
    "cifar10": "the CIFAR-10 'python version' (cifar-10-python.tar.gz) from "
               "https://www.cs.toronto.edu/~kriz/cifar.html, extracted into {path} "
               "(tar xzf cifar-10-python.tar.gz -C {path})",
    "celeba": "from the CelebA site https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html: "
              "'Align&Cropped Images' -> img_align_celeba.zip (unzip into {path}) and "
              "Eval/list_eval_partition.txt (put in {path})",
    "lsun": "the {category} lmdb from the LSUN site (https://www.yf.io/p/lsun, tools at "
            "https://github.com/fyu/lsun), exported to image files: "
            "python data.py export {category}_train_lmdb --out_dir {path}",
    "folder": "any images of your own (.jpg, .jpeg, .png, .webp, .tif, .tiff) in {path}",
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk where deqlit looks; the message names the path, layout and source.

    `path` is the dataset folder and `layout` the expected tree, so a caller (e.g. the inversion
    script) can merge this with its own missing-file messages.
    """

    def __init__(self, message: str, path: Path, layout: str):
        super().__init__(message)
        self.path = path
        self.layout = layout


def _kind(name: str) -> str:
    """'cifar10' | 'celeba' | 'lsun' | 'folder' | 'bundled' for a --data name; ValueError if unknown."""
    if name in BUNDLED:
        return "bundled"
    if name in ("cifar10", "celeba"):
        return name
    if name in ("lsun-bedroom", "lsun-church"):
        return "lsun"
    if name.startswith("folder:"):
        if not name[len("folder:"):].strip():
            raise ValueError("--data folder:PATH needs a path, e.g. folder:./my_images")
        return "folder"
    raise ValueError(f"unknown dataset {name!r}; known names: {', '.join(KNOWN_NAMES)}")


def dataset_path(name: str, root: str | Path = "data") -> Path:
    """The folder dataset `name` is read from: <root>/<name>, or PATH itself for folder:PATH."""
    kind = _kind(name)
    if kind == "bundled":
        raise ValueError(f"{name!r} is bundled with an installed package; it has no folder on disk")
    if kind == "folder":
        return Path(name[len("folder:"):]).expanduser()
    return Path(root) / name


def expected_layout(name: str, root: str | Path = "data") -> str:
    """The tree of files dataset `name` needs under `root`, as indented text."""
    kind = _kind(name)
    if kind == "bundled":
        return f"{name}: bundled with an installed package; nothing to put on disk"
    path = dataset_path(name, root)
    if kind == "cifar10":
        return (f"{path}/\n  {CIFAR_DIR}/\n"
                "    data_batch_1 ... data_batch_5   (train, 10,000 images each)\n"
                "    test_batch                      (test, 10,000 images)\n"
                "    batches.meta                    (optional: class names)")
    if kind == "celeba":
        return (f"{path}/\n"
                "  list_eval_partition.txt   (lines '000001.jpg 0'; 0 train, 1 valid, 2 test)\n"
                "  img_align_celeba/\n"
                "    000001.jpg ... 202599.jpg   (178x218 aligned face crops)")
    return (f"{path}/\n  *.jpg | *.jpeg | *.png | *.webp | *.tif | *.tiff   (at any depth, e.g. "
            "in sub-folders; 8- or 16-bit, grey or colour)\n"
            f"  split: sorted paths, every {FOLDER_TEST_EVERY}th image (the 1st, 11th, ...) is "
            "'test', the rest 'train'; 'all' takes every image")


def _not_found(name: str, root: str | Path, problem: str) -> DatasetNotFoundError:
    """The DatasetNotFoundError for `name`: the problem, the expected tree, and where to get it."""
    path, layout = dataset_path(name, root), expected_layout(name, root)
    kind = _kind(name)
    category = {"lsun-bedroom": "bedroom", "lsun-church": "church_outdoor"}.get(name, "")
    source = _SOURCES[kind].format(path=path, category=category)
    fix = ("check the PATH after 'folder:'" if kind == "folder" else "put the files there, or "
           "point the config key data.root (--data.root PATH) at the folder that holds them")
    message = (f"dataset {name!r}: {problem}\nExpected layout:\n{layout}\nGet it: {source}.\n"
               f"deqlit never downloads data: {fix}.")
    return DatasetNotFoundError(message, path, layout)


def _check_split(split: str, allowed: list[str] | tuple[str, ...], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r} for {name!r}: use one of {', '.join(allowed)}")


def _to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).float().div_(127.5).sub_(1.0)


# --- CIFAR-10 ---------------------------------------------------------------------------------
# Read with our own reader rather than torchvision.datasets.CIFAR10: that class md5-checks every
# batch file against the official archive (so a partial or test copy is rejected as "corrupted,
# use download=True") and always loads all 50,000 images. The python-version format is one
# pickled dict per batch: b'data' a uint8 array (N, 3072) whose rows hold the 1024 red, then
# 1024 green, then 1024 blue values of a 32x32 image in row-major order; b'labels' N ints.

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle from disk can otherwise run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"),
                ("_codecs", "encode")}  # how Python 3's protocol-2 pickles spell bytes

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # The official batches name numpy.core (numpy 1); numpy 2 moved it to numpy._core.
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 python-version batch file -> uint8 (N, 3, 32, 32)."""
    try:
        with open(path, "rb") as handle:
            # latin1: the official files were pickled by Python 2 (numpy's advice for those).
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
        data = entry.get("data", entry.get(b"data")) if isinstance(entry, dict) else None
        pixels = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise ValueError(f"cannot read CIFAR-10 batch {path}: {err}. Expected a pickled dict with "
                         "b'data' uint8 (N, 3072); re-extract cifar-10-python.tar.gz") from err
    return pixels


def _load_cifar10(split: str, root: str | Path, limit: int | None) -> torch.Tensor:
    """CIFAR-10 'train' (50k) / 'test' (10k) / 'all' -> float32 (N, 3, 32, 32) in [-1, 1]."""
    _check_split(split, list(CIFAR_BATCHES), "cifar10")
    folder = dataset_path("cifar10", root) / CIFAR_DIR
    missing = [str(folder / f) for f in CIFAR_BATCHES[split] if not (folder / f).is_file()]
    if missing:
        tarball = dataset_path("cifar10", root) / "cifar-10-python.tar.gz"
        hint = f" ({tarball} is there: extract it)" if tarball.is_file() else ""
        raise _not_found("cifar10", root, f"missing {', '.join(missing)}{hint}")
    parts, count = [], 0
    for file in CIFAR_BATCHES[split]:
        if limit is not None and count >= limit:
            break  # later batches are never opened
        pixels = read_cifar_batch(folder / file)
        parts.append(pixels if limit is None else pixels[:limit - count])
        count += len(parts[-1])
    pixels = np.concatenate(parts) if parts else np.zeros((0, 3, 32, 32), np.uint8)
    return _to_unit_range(pixels)


# --- image files (CelebA, LSUN, folder:PATH) ---------------------------------------------------

def _center_square(image: Image.Image) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of the largest centered square of `image`."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return left, top, left + side, top + side


def _celeba_box(file: Path) -> Callable[[Image.Image], tuple[int, int, int, int]]:
    def box(image: Image.Image) -> tuple[int, int, int, int]:
        if image.size != CELEBA_SIZE:
            raise ValueError(f"{file} is {image.size[0]}x{image.size[1]}, not the 178x218 of "
                             "CelebA's 'Align&Cropped Images' (img_align_celeba)")
        return CELEBA_CROP_BOX
    return box


def _decode(files: list[Path], resolution: int, channels: int, celeba: bool) -> torch.Tensor:
    """Image files -> float32 (N, channels, resolution, resolution) in [-1, 1], one at a time.

    CelebA gets DDIM's fixed face crop; other images their center square. PIL's bilinear resize
    (antialiased when shrinking) is what torchvision's Resize does to the PIL images in DDIM; see
    deqlit.data.pixels for bit depths. Warns once, naming them, about images far smaller than
    the resolution (their crop's side under half of it): they are blown up and blurred.
    """
    images = torch.empty((len(files), channels, resolution, resolution))
    small = []
    for i, file in enumerate(files):
        box = _celeba_box(file) if celeba else _center_square
        pixels, size = decode_image(file, resolution, box)
        images[i] = to_channels(pixels[None], channels)[0]
        note = small_image_note(file, size, 128 if celeba else min(size), resolution)
        if note:
            small.append(note)
    if small:
        shown = "; ".join(small[:5]) + (f"; and {len(small) - 5} more" if len(small) > 5 else "")
        warnings.warn(f"{len(small)} image(s) are far smaller than the model's "
                      f"{resolution}x{resolution} (cropped side under {resolution / 2:g}), so they "
                      f"are upscaled and blurred: {shown}", UserWarning, stacklevel=3)
    return images


def celeba_files(split: str, root: str | Path = "data") -> list[Path]:
    """The img_align_celeba files of `split` ('train' | 'valid' | 'test' | 'all'), in list order."""
    _check_split(split, list(CELEBA_PARTITIONS), "celeba")
    folder = dataset_path("celeba", root)
    partition, images = folder / "list_eval_partition.txt", folder / "img_align_celeba"
    missing = [str(p) for p in (partition, images) if not p.exists()]
    if missing:
        zipped = folder / "img_align_celeba.zip"
        hint = f" ({zipped} is there: unzip it)" if zipped.is_file() else ""
        raise _not_found("celeba", root, f"missing {', '.join(missing)}{hint}")
    files = []
    for number, line in enumerate(partition.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{partition} line {number}: expected 'NNNNNN.jpg 0|1|2', got {line!r}")
        if int(fields[1]) in CELEBA_PARTITIONS[split]:
            files.append(images / fields[0])
    return files


def describe_entry(path: Path, folder: Path) -> str:
    """What an entry under `folder` is, in words: 'a symlink loop: x -> x', 'a broken symlink:
    a.png -> gone.png', 'a folder: sub', 'a file: notes.txt'."""
    name = path.relative_to(folder).as_posix()
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        try:
            path.stat()
        except OSError as err:
            kind = "a symlink loop" if err.errno == errno.ELOOP else "a broken symlink"
            return f"{kind}: {name} -> {target}"
    if path.is_dir():
        return f"a folder: {name}"
    return f"a file: {name}" if path.is_file() else f"a special file: {name}"


def unresolved_links(folder: Path) -> list[Path]:
    """The symlinks under `folder` that lead nowhere (loops, missing targets)."""
    return [p for p in folder.rglob("*") if p.is_symlink() and not p.exists()]


def describe_contents(folder: Path, limit: int = 3) -> str:
    """'is empty', or 'holds 1 entry, a symlink loop: x -> x', or 'holds 4 entries: a file: a.txt,
    ...' (the first `limit`, hidden ones counted too): what a folder without images holds."""
    entries = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
    if not entries:
        return "is empty"
    described = [describe_entry(p, folder) for p in entries[:limit]]
    more = f", and {len(entries) - limit} more" if len(entries) > limit else ""
    if len(entries) == 1:
        return f"holds 1 entry, {described[0]}"
    return f"holds {len(entries)} entries: " + "; ".join(described) + more


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder` (any depth), sorted by relative path; hidden files skipped.

    Other files are skipped with one warning that counts them by suffix; symlinks that lead
    nowhere (loops, missing targets) are named in it.
    """
    found, skipped = [], {}
    for p in folder.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            found.append(p)
        else:
            suffix = p.suffix.lower() or "(no suffix)"
            skipped[suffix] = skipped.get(suffix, 0) + 1
    if skipped:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(skipped.items()))
        warnings.warn(f"{folder}: skipped {sum(skipped.values())} file(s) that are not images "
                      f"deqlit reads ({counts}); it reads {', '.join(IMAGE_SUFFIXES)}",
                      UserWarning, stacklevel=3)
    dangling = unresolved_links(folder)
    if dangling and found:
        shown = "; ".join(describe_entry(p, folder) for p in dangling[:3])
        warnings.warn(f"{folder}: skipped {len(dangling)} symlink(s) that lead to no file ({shown})",
                      UserWarning, stacklevel=3)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def split_files(files: list[Path], split: str) -> list[Path]:
    """The fixed folder split: file i (sorted order) is 'test' if i % 10 == 0, else 'train'."""
    _check_split(split, ("train", "test", "all"), "an image folder")
    if split == "all":
        return files
    is_test = split == "test"
    return [f for i, f in enumerate(files) if (i % FOLDER_TEST_EVERY == 0) == is_test]


def _folder_files(name: str, split: str, root: str | Path) -> list[Path]:
    """The sorted image files of an LSUN or folder:PATH dataset's `split`."""
    folder = dataset_path(name, root)
    if not folder.is_dir():
        raise _not_found(name, root, f"no folder {folder}")
    files = image_files(folder)
    if not files:
        raise _not_found(name, root, f"folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files: "
                                     f"it {describe_contents(folder)}")
    chosen = split_files(files, split)
    if not chosen:
        raise ValueError(f"split {split!r} of {folder} is empty: it holds {len(files)} image(s) and "
                         f"every {FOLDER_TEST_EVERY}th (from the first) is 'test'; use split 'all'")
    return chosen


def load_local_dataset(name: str, split: str, resolution: int, channels: int,
                       root: str | Path = "data", limit: int | None = None) -> torch.Tensor:
    """Images of an on-disk dataset: float32 (N, channels, resolution, resolution) in [-1, 1].

    name: cifar10 | celeba | lsun-bedroom | lsun-church | folder:PATH. Only the first `limit`
    images of the split are decoded. Raises DatasetNotFoundError when the files are missing.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    kind = _kind(name)
    if kind == "bundled":
        raise ValueError(f"{name!r} is bundled: load it with deqlit.data.registry.load_images")
    if kind == "cifar10":
        images = resize(_load_cifar10(split, root, limit), resolution).clamp(-1, 1)
    else:
        files = celeba_files(split, root) if kind == "celeba" else _folder_files(name, split, root)
        files = files if limit is None else files[:limit]
        for file in files:
            if not file.is_file():  # CelebA lists files the folder may lack (partial unzip)
                raise _not_found(name, root, f"missing {file}, listed in list_eval_partition.txt")
        return _decode(files, resolution, channels, celeba=kind == "celeba")
    return to_channels(images, channels)
