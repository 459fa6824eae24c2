"""Sample-quality evaluation: FID/KID from a local Inception file, the offline fd-random/kd-random
on fixed random conv features, and the held-out denoising loss.

    from deqlit.evaluation import sample_metrics
    sample_metrics(samples, reference, "fd-random,kd-random")   # no download, no weights file
"""
from __future__ import annotations

import torch

from deqlit.evaluation.denoising import denoising_loss
from deqlit.evaluation.features import (INCEPTION_FILE, InceptionFeatures, InceptionWeightsMissing,
                                        RandomConvFeatures)
from deqlit.evaluation.metrics import (METRICS, RANDOM_NOTE, DatasetMetrics, ImageMetrics, format_metrics,
                                       parse_metric_names, sample_metrics)


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 16, seed: int = 0) -> float:
    """kd-random (kernel distance on RandomConvFeatures(seed 0)), mean over 50 subsets of
    `subset_size`. Images (N, C, H, W) in [-1, 1]. Not comparable with published KIDs."""
    values = sample_metrics(fake, real, ["kd-random"], kid_subset_size=subset_size, kid_subsets=50)
    return values["kd-random"]


__all__ = ["INCEPTION_FILE", "METRICS", "RANDOM_NOTE", "DatasetMetrics", "ImageMetrics", "InceptionFeatures",
           "InceptionWeightsMissing", "RandomConvFeatures", "denoising_loss", "format_metrics", "kid",
           "parse_metric_names", "sample_metrics"]
