"""Datasets that decode one image at a time: (index, image) pairs for inversion and training.

The loaders in deqlit.data.folders decode whole splits (fine for 16 faces, ~8 GB as float32 for
CelebA and impossible for LSUN). These datasets hold only the list of files (or, for CIFAR-10,
one 10,000-image batch file at a time) and decode an image when a DataLoader asks for it, so
memory does not grow with the dataset. An item is (index, image): index is the image's position
in the split, which names its results and seeds its latent, whatever the batching.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from deqlit.data import folders
from deqlit.data.faces import resize, to_channels

_CIFAR_PER_FILE = 10_000


class TensorImages(Dataset):
    """A split already in memory (the bundled sets): images (N, C, H, W) in [-1, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class ImageFiles(Dataset):
    """Image files (CelebA, LSUN exports, folder:PATH) decoded on access."""

    def __init__(self, files: list[Path], resolution: int, channels: int, celeba: bool):
        self.files, self.resolution, self.channels, self.celeba = files, resolution, channels, celeba

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        file = self.files[i]
        if not file.is_file():
            raise FileNotFoundError(f"image {file} is listed but missing (a partial unzip or copy?)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # size warnings were given once, on the first images
            return folders._decode([file], self.resolution, self.channels, self.celeba)[0]


class CifarBatches(Dataset):
    """CIFAR-10's python-version batch files, one file (30 MB of uint8) cached at a time."""

    def __init__(self, files: list[Path], resolution: int, channels: int):
        self.files, self.resolution, self.channels = files, resolution, channels
        self._cached: tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return len(self.files) * _CIFAR_PER_FILE

    def __getitem__(self, i: int) -> torch.Tensor:
        which, offset = divmod(i, _CIFAR_PER_FILE)
        if self._cached[0] != which:
            self._cached = (which, folders.read_cifar_batch(self.files[which]))
        pixels = torch.from_numpy(self._cached[1][offset].copy()).float().div_(127.5).sub_(1.0)
        image = resize(pixels[None], self.resolution).clamp(-1, 1)
        return to_channels(image, self.channels)[0]


class Indexed(Dataset):
    """(index, image) for the chosen positions of a split; `positions` = which images to serve."""

    def __init__(self, images: Dataset, positions: Sequence[int]):
        self.images, self.positions = images, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        index = self.positions[i]
        return index, self.images[index]


def split_dataset(name: str, split: str, resolution: int, channels: int,
                  root: str | Path = "data") -> Dataset:
    """Every image of a split, decoded lazily; images (channels, resolution, resolution) in [-1, 1].

    Raises DatasetNotFoundError (with the expected layout) when the files are not on disk.
    """
    if name in folders.BUNDLED:
        from deqlit.data.registry import load_images
        return TensorImages(load_images(name, split, resolution, channels, str(root)))
    kind = folders._kind(name)
    if kind == "cifar10":
        folders._load_cifar10(split, root, limit=0)      # checks the files, decodes nothing
        folder = folders.dataset_path("cifar10", root) / folders.CIFAR_DIR
        return CifarBatches([folder / f for f in folders.CIFAR_BATCHES[split]], resolution, channels)
    files = (folders.celeba_files(split, root) if kind == "celeba"
             else folders._folder_files(name, split, root))
    if files:   # decode the first image now: a wrong size or format fails before any compute
        folders._decode(files[:1], resolution, channels, celeba=kind == "celeba")
    return ImageFiles(files, resolution, channels, celeba=kind == "celeba")
