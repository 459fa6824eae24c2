"""Sample-quality metrics by name: fid, kid (Inception-v3 from a local file) and fd-random,
kd-random (fixed random conv features, offline; never called FID).

`ImageMetrics` holds one feature net per family and torchmetrics objects on its features, so it
accumulates over batches, moves with `.to(device)` and syncs across processes; `sample_metrics`
is the one-call form that sample.py uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from deqlit.evaluation.distances import compute_kernel, frechet_metric, kernel_metric
from deqlit.evaluation.features import InceptionFeatures, RandomConvFeatures, check_images

METRICS = ("fid", "kid", "fd-random", "kd-random")
# metric name -> (feature family, distance kind)
_KIND = {"fid": ("inception", "frechet"), "kid": ("inception", "kernel"),
         "fd-random": ("random", "frechet"), "kd-random": ("random", "kernel")}
RANDOM_NOTE = ("fd-random / kd-random: Frechet / kernel distances on fixed random conv features; "
               "a relative measure, NOT comparable with published FIDs")


def parse_metric_names(names: str | Sequence[str] | None) -> list[str]:
    """'fid,kid' or ['fid', 'kid'] -> a checked list (an unknown name raises, naming the choices)."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in names.replace(" ", "").split(",") if n]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)} "
                         "(fd-random / kd-random need no download)")
    return list(dict.fromkeys(names))


class ImageMetrics(nn.Module):
    """Named distances between real and generated images in [-1, 1] (N, C, H, W).

    Args: names (subset of METRICS), channels of the images, fid_weights (the Inception file; only
    read when fid or kid is asked for), random_seed / random_width (the random feature net),
    kid_subset_size / kid_subsets, process_group (which processes' images are pooled; None = all),
    sync (False: compute() uses this process's images only, e.g. when one process holds them all).
    update(images, real) accumulates; compute() -> {name: value, ...} plus the feature nets used.
    """

    def __init__(self, names: str | Sequence[str], channels: int, fid_weights: str | Path | None = None,
                 random_seed: int = 0, random_width: int = 16, kid_subset_size: int = 1000,
                 kid_subsets: int = 100, process_group: Optional[Any] = None, sync: bool = True):
        super().__init__()
        self.names = parse_metric_names(names)
        if not self.names:
            raise ValueError(f"no metric asked for: choose from {', '.join(METRICS)}")
        if channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {channels}")
        self.channels = channels
        families = {_KIND[n][0] for n in self.names}
        self.features = nn.ModuleDict()
        if "inception" in families:
            self.features["inception"] = InceptionFeatures(fid_weights)
        if "random" in families:
            self.features["random"] = RandomConvFeatures(channels, seed=random_seed, width=random_width)
        self.distances = nn.ModuleDict()
        for name in self.names:
            family, kind = _KIND[name]
            dim = self.features[family].num_features
            self.distances[name] = (frechet_metric(dim, process_group, sync) if kind == "frechet" else
                                    kernel_metric(dim, kid_subset_size, kid_subsets, process_group, sync))
        self.requires_grad_(False)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        images = check_images(images, "real images" if real else "generated images")
        if images.shape[1] != self.channels:
            raise ValueError(f"images have {images.shape[1]} channels, the metrics were built for {self.channels}")
        images = images.to(self.device)
        for family, net in self.features.items():
            feats = net(images)
            for name in self.names:
                if _KIND[name][0] == family:
                    self.distances[name].update(feats, real=real)

    def compute(self, seed: int = 0) -> dict[str, Any]:
        """{'fid': x, 'kid': mean, 'kid_std': std, 'fd-random': ..., 'features': {...}}."""
        out: dict[str, Any] = {}
        for name in self.names:
            metric = self.distances[name]
            if _KIND[name][1] == "frechet":
                out[name] = float(metric.compute())
            else:
                out[name], out[f"{name}_std"] = compute_kernel(metric, seed)
        out["features"] = {family: net.describe() for family, net in self.features.items()}
        if "random" in self.features:
            out["note"] = RANDOM_NOTE
        return out

    def reset(self, real: bool = True) -> None:
        """Forget the generated images (and the real ones too unless real=False)."""
        for metric in self.distances.values():
            metric.reset_real_features = real
            metric.reset()

    @property
    def device(self) -> torch.device:
        return next(iter(self.distances.values())).device


def sample_metrics(samples: torch.Tensor, ref_images: torch.Tensor, names: str | Sequence[str],
                   fid_weights: str | Path | None = None, batch_size: int = 64,
                   device: str | torch.device = "cpu", **options: Any) -> dict[str, Any]:
    """Distances between generated `samples` and `ref_images`, both (N, C, H, W) in [-1, 1].

    Returns {name: value, name_std (kernel ones), 'features': the nets used, 'num_samples',
    'num_reference', 'note' (when random features are used)}.
    """
    samples = check_images(samples, "samples")
    ref_images = check_images(ref_images, "reference images")
    if samples.shape[1:] != ref_images.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape[1:])} and reference images "
                         f"{tuple(ref_images.shape[1:])} differ in shape; load the reference set "
                         "at the model's resolution and channels")
    metrics = ImageMetrics(names, samples.shape[1], fid_weights, **options).to(device)
    for images, real in ((ref_images, True), (samples, False)):
        for chunk in images.split(batch_size):
            metrics.update(chunk, real=real)
    out = metrics.compute()
    out["num_samples"], out["num_reference"] = len(samples), len(ref_images)
    return out


def format_metrics(values: dict[str, Any]) -> str:
    """One line for a terminal, with the caveat for random-feature distances."""
    parts = [f"{n} {values[n]:.4g}" + (f" +- {values[n + '_std']:.2g}" if n + "_std" in values else "")
             for n in METRICS if n in values]
    line = ", ".join(parts)
    if "note" in values:
        line += f"  [{values['note']}]"
    return line


def load_reference(name: str, split: str, resolution: int, channels: int, root: str = "data",
                   limit: Optional[int] = 50_000) -> torch.Tensor:
    """Reference images (N, C, H, W) in [-1, 1]: at most `limit` of the split (a cap, so a split
    that holds fewer is not worth a warning)."""
    import warnings

    from deqlit.data.registry import load_images
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="asked for .* images but split")
        return load_images(name, split, resolution, channels, root, limit)


class DatasetMetrics:
    """Distances of generated images to a named dataset (sample.py --metrics ... --ref-data NAME).

    Built before sampling so that a missing weights file or dataset fails at once; the reference
    images (N, C, H, W) load through deqlit.data.registry at the samples' resolution and channels
    and their features are computed here. Calling it with samples (B, C, H, W) in [-1, 1] returns
    the values plus what they were measured against.

    The caller holds every sample (sample.py gathers them on rank 0, which alone computes), so
    compute() never syncs across processes: a sync would wait on processes that have returned.
    """

    def __init__(self, names: str | Sequence[str], ref_data: str, channels: int, resolution: int,
                 root: str = "data", fid_weights: str | Path | None = None, split: str = "train",
                 limit: Optional[int] = 50_000, device: str | torch.device = "cpu",
                 batch_size: int = 64, **options: Any):
        self.metrics = ImageMetrics(names, channels, fid_weights, sync=False, **options).to(device)
        reference = load_reference(ref_data, split, resolution, channels, root, limit)
        for chunk in reference.split(batch_size):
            self.metrics.update(chunk, real=True)
        self.batch_size = batch_size
        self.reference = {"ref_data": ref_data, "ref_split": split, "num_reference": len(reference)}

    @classmethod
    def from_config(cls, names: str | Sequence[str], cfg: dict, model: nn.Module,
                    ref_data: Optional[str] = None, fid_weights: Optional[str] = None) -> "DatasetMetrics":
        """From a resolved config: ref_data defaults to data.name, fid_weights to
        evaluation.fid_weights; the images take the model's channels and resolution."""
        evaluation = cfg.get("evaluation") or {}
        return cls(names, ref_data or cfg["data"]["name"], model.in_channels, model.resolution,
                   root=cfg["data"].get("root", "data"),
                   fid_weights=fid_weights or evaluation.get("fid_weights"),
                   limit=evaluation.get("ref_limit", 50_000),
                   device=next(model.parameters()).device)

    def __call__(self, samples: torch.Tensor) -> dict[str, Any]:
        # The evaluator is built before the model moves to its device: follow the samples there.
        self.metrics.to(samples.device)
        self.metrics.reset(real=False)
        for chunk in check_images(samples, "samples").split(self.batch_size):
            self.metrics.update(chunk, real=False)
        return {**self.metrics.compute(), **self.reference, "num_samples": len(samples)}
