"""Feature networks that map images in [-1, 1] to vectors: fixed random convolutions (always
available, offline) and Inception-v3 from a local weights file (for FID and KID proper).

Random-network features are a valid relative measure of sample quality (Naeem et al. 2020; Lee et
al. 2022) but their distances are NOT comparable with published FIDs: they depend on the seed and
shape of the net, which `RandomConvFeatures.describe()` records next to every figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE = ("torch-fidelity's release v0.2.0 (github.com/toshas/torch-fidelity/releases, "
                    f"file {INCEPTION_FILE}; the TF Inception-v3 of the original FID, converted)")


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file for FID/KID is not where it was said to be."""


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """(N, C, H, W) float images with C in {1, 3}; returned as float32."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (N, C, H, W) with 1 or 3 channels in [-1, 1], "
                         f"got shape {tuple(images.shape)}")
    if not torch.is_floating_point(images):
        raise ValueError(f"{what} must be float in [-1, 1], got dtype {images.dtype}")
    return images.float()


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, 1 or 3, H, W) -> uint8 (N, 3, H, W) in [0, 255]; grey is repeated to RGB."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class RandomConvFeatures(nn.Module):
    """Images in [-1, 1] (N, C, H, W) -> (N, 4 * width * 16) features from 3 fixed random conv layers.

    The weights come from `seed` alone, so two runs with the same (in_channels, seed, width) embed
    images identically. width 16 gives 1024 features: the Frechet distance's matrix square root
    costs ~1 s at 1024 dims on one CPU thread and ~50 s at 4096. uint8 input in [0, 255] is accepted too (what torchmetrics hands over with
    normalize=True).
    """

    def __init__(self, in_channels: int = 1, seed: int = 0, width: int = 16):
        super().__init__()
        self.in_channels, self.seed, self.width = in_channels, seed, width
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        channels = in_channels
        for out in (width, width * 2, width * 4):
            conv = nn.Conv2d(channels, out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * channels)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
            channels = out
        self.num_features = width * 4 * 16
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        # Keep a coarse 4x4 layout: with global pooling alone a flat grey image scores like a face.
        return F.adaptive_avg_pool2d(h, 4).flatten(1)          # (N, 4 * width * 16)

    def describe(self) -> dict[str, Any]:
        """What a reader needs to reproduce (and not over-read) a distance on these features."""
        return {"net": "RandomConvFeatures", "seed": self.seed, "in_channels": self.in_channels,
                "width": self.width, "layers": 3, "dim": self.num_features,
                "comparable_with_published_fid": False}


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (N, 1 or 3, H, W) -> (N, 2048) pool features of the FID Inception-v3.

    Wraps torchmetrics' NoTrainInceptionV3 (torch-fidelity's network) built from a local file; it
    resizes to 299 x 299 itself, with TF1-compatible bilinear interpolation (antialias off), as the
    original FID does.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = check_inception_weights(weights_path)
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            import torch_fidelity  # noqa: F401  (NoTrainInceptionV3 needs it)
        except ImportError as err:
            raise ImportError("FID/KID need torch-fidelity's Inception network: "
                              "pip install -e \".[fid]\" (or use the offline metrics fd-random, "
                              "kd-random)") from err
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path), antialias=False)
        self.weights_path = str(path)
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8_rgb(check_images(images)))

    def describe(self) -> dict[str, Any]:
        return {"net": "InceptionV3 (torch-fidelity, pool3)", "weights": self.weights_path,
                "dim": self.num_features}


def check_inception_weights(path: str | Path | None) -> Path:
    """The weights file as a Path, or an error that names it, its source and the offline way."""
    if not path:
        raise InceptionWeightsMissing(
            "FID and KID need the Inception-v3 weights file and deqlit never downloads: pass "
            f"--fid-weights PATH (or set evaluation.fid_weights) to {INCEPTION_FILE} from "
            f"{INCEPTION_SOURCE}. Offline alternative: --metrics fd-random,kd-random (random "
            "conv features; not comparable with published FIDs)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights not found at {path}. FID and KID read them from a local file "
            f"({INCEPTION_FILE}, from {INCEPTION_SOURCE}); copy it there or pass --fid-weights "
            "PATH. Offline alternative: --metrics fd-random,kd-random (random conv features; not "
            "comparable with published FIDs)")
    # torch-fidelity loads the file with weights_only=False; make sure it holds tensors only.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable tensor file ({err}); expected {INCEPTION_FILE}") from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{path} does not hold torch-fidelity's Inception-v3 state_dict "
                         f"(expected {INCEPTION_FILE}, keys like 'Mixed_7c.branch_pool.conv.weight')")
    return path
