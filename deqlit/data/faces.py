"""Datasets that ship inside installed packages, so deqlit runs with no download.

- faces: the 100 face crops of scikit-image's LFW subset (25x25 grayscale), resized.
- digits: scikit-learn's 1,797 handwritten digits (8x8), upsampled.

Images are float32 tensors (N, C, H, W) in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FACES_TOTAL = 100
FACES_HELD_OUT = 16
SPLIT_SEED = 0


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, resolution, resolution), bilinear with antialiasing when shrinking."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                         align_corners=False, antialias=True)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale (N, 1, H, W) -> (N, channels, H, W) by repetition."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.repeat(1, channels, 1, 1)
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


def face_split_indices(split: str) -> list[int]:
    """The fixed split of the 100 faces: 84 'train', 16 'test' (never trained on)."""
    order = torch.randperm(FACES_TOTAL, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    held_out = sorted(order[:FACES_HELD_OUT])
    if split == "test":
        return held_out
    if split == "train":
        return [i for i in range(FACES_TOTAL) if i not in set(held_out)]
    if split == "all":
        return list(range(FACES_TOTAL))
    raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'")


def load_faces(split: str = "train", resolution: int = 32, channels: int = 1) -> torch.Tensor:
    """LFW faces from scikit-image, (N, channels, resolution, resolution) in [-1, 1]."""
    try:
        from skimage.data import lfw_subset
    except ImportError as err:  # pragma: no cover - scikit-image is a dependency
        raise ImportError("the 'faces' dataset needs scikit-image: pip install scikit-image") from err
    # lfw_subset() holds 100 faces followed by 100 non-faces, each 25x25 in [0, 1].
    faces = torch.from_numpy(lfw_subset()[:FACES_TOTAL]).float()[:, None]
    faces = faces[face_split_indices(split)]
    images = resize(faces * 2 - 1, resolution).clamp(-1, 1)
    return to_channels(images, channels)


def load_digits(split: str = "train", resolution: int = 16, channels: int = 1) -> torch.Tensor:
    """scikit-learn's digits, (N, channels, resolution, resolution) in [-1, 1]; last 10% is 'test'."""
    from sklearn.datasets import load_digits as sk_digits

    digits = torch.from_numpy(sk_digits().images).float()[:, None] / 16.0  # (1797, 1, 8, 8)
    cut = int(len(digits) * 0.9)
    if split == "train":
        digits = digits[:cut]
    elif split == "test":
        digits = digits[cut:]
    elif split != "all":
        raise ValueError(f"unknown split {split!r}: use 'train', 'test' or 'all'")
    images = resize(digits * 2 - 1, resolution).clamp(-1, 1)
    return to_channels(images, channels)
