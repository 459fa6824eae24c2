"""Frechet and kernel distances between two sets of feature vectors, as torchmetrics objects.

torchmetrics' FrechetInceptionDistance / KernelInceptionDistance run their feature network inside
`update`. Here the features are computed once per batch (one network pass serves both distances)
and handed to the metrics through `Passthrough`, so the metrics keep what they are good at: state
that accumulates over batches and syncs across processes (`process_group`), float64 statistics,
and the standard formulas
    FD  = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))           (Heusel et al. 2017)
    KD  = unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3, mean over random subsets
                                                                      (Binkowski et al. 2018).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class Passthrough(nn.Module):
    """Features (N, dim) -> the same features: lets torchmetrics' image metrics take features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_metric(dim: int, process_group: Optional[Any] = None, sync: bool = True
                   ) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance over (N, dim) features; update(features, real=...). `sync`:
    compute() pools every process's features (False: this process's only)."""
    return FrechetInceptionDistance(feature=Passthrough(dim), normalize=True,
                                    process_group=process_group, sync_on_compute=sync)


def kernel_metric(dim: int, subset_size: int = 1000, subsets: int = 100,
                  process_group: Optional[Any] = None, sync: bool = True) -> KernelInceptionDistance:
    """A KernelInceptionDistance over (N, dim) features; update(features, real=...); `sync` as
    for frechet_metric."""
    with warnings.catch_warnings():   # "saves all features in a buffer": known, and small here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        return KernelInceptionDistance(feature=Passthrough(dim), subset_size=subset_size,
                                       subsets=subsets, normalize=True, process_group=process_group,
                                       sync_on_compute=sync)


def feature_count(metric: KernelInceptionDistance) -> tuple[int, int]:
    """(real, fake) feature rows that a kernel metric holds in this process."""
    return (sum(len(f) for f in metric.real_features), sum(len(f) for f in metric.fake_features))


def compute_kernel(metric: KernelInceptionDistance, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over subsets, reproducible: the subsets come from `seed`, not the global RNG.

    The subset size shrinks to the number of rows this process holds when fewer than asked
    (a 16-image check must not fail on the default 1000).
    """
    n = min(feature_count(metric))
    if n < 2:
        raise ValueError(f"a kernel distance needs >= 2 real and >= 2 generated images, got {feature_count(metric)}")
    asked = metric.subset_size
    metric.subset_size = min(asked, n)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
    finally:
        metric.subset_size = asked
    return float(mean), float(std)
