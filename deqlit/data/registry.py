"""`--data NAME` -> image tensors. Bundled sets load from installed packages; the paper's sets load
from local folders (see deqlit.data.folders) and are never downloaded."""
from __future__ import annotations

import warnings

import torch

from deqlit.data.faces import load_digits, load_faces


def load_images(name: str, split: str, resolution: int, channels: int, root: str = "data",
                limit: int | None = None) -> torch.Tensor:
    """Images of dataset `name`, (N, channels, resolution, resolution) float32 in [-1, 1].

    With `limit`, the first `limit` images of the split; warns when the split holds fewer.
    """
    if name == "faces":
        images = load_faces(split, resolution, channels)
    elif name == "digits":
        images = load_digits(split, resolution, channels)
    else:
        from deqlit.data.folders import load_local_dataset
        images = load_local_dataset(name, split, resolution, channels, root, limit)
    if limit is None:
        return images
    if len(images) < limit:  # the loaders read a whole split when it is shorter than `limit`
        warnings.warn(f"asked for {limit} images but split {split!r} of {name!r} holds "
                      f"{len(images)}; using {len(images)}", UserWarning, stacklevel=2)
    return images[:limit]
