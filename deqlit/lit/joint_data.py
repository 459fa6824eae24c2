"""The data of joint fine-tuning (`train.py --task joint`): the fine-tuning set and the prior set,
both streamed (deqlit.data.streaming decodes an image when a batch asks for it; the bundled sets
are in memory anyway), so memory does not grow with either set.

  targets  (index, image) batches of the fine-tuning split's first `num_images` images (null =
           all); index = the image's position in the split, which names its latent row.
  prior    image batches of the original training data for the prior-preservation loss,
           `prior_batch_size` images a step, drawn with replacement.
The KID reference and the final denoising MSE use a bounded subset: the first
`reference_images` images of the prior split (prior_images()).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from deqlit.data.streaming import Indexed, TensorImages
from deqlit.guards import UserInputError


class IndexedImages(Indexed):
    """(index, image) pairs of an image tensor (N, C, H, W): the index names the image's latent."""

    def __init__(self, images: torch.Tensor):
        super().__init__(TensorImages(images), range(len(images)))


class EpochSampler(Sampler[int]):
    """A permutation (or `draws` draws with replacement) seeded by (seed, epoch), so a resumed run
    sees the same order as an uninterrupted one. With `progress()` (the restored global step; one
    training step per batch) the epoch is read from it when an iterator starts, and the batches it
    says were done are skipped: Lightning restarts a resumed epoch's order from its beginning, and
    builds a resumed fit's first iterator before it calls set_epoch (with num_workers > 0 the
    indices are drawn right then). Without it, the Trainer's set_epoch decides. The order is kept
    as one int64 tensor (8 bytes an image), not a Python list."""

    def __init__(self, size: int, seed: int, draws: Optional[int] = None, per_batch: int = 1,
                 steps_per_epoch: int = 1, progress: Optional[Callable[[], int]] = None):
        self.size, self.seed, self.draws, self.epoch = size, seed, draws, 0
        self.per_batch, self.steps_per_epoch, self.progress = per_batch, steps_per_epoch, progress

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size if self.draws is None else self.draws

    def __iter__(self):
        if self.progress is not None:
            self.epoch = self.progress() // self.steps_per_epoch
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.draws is None:
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.randint(0, self.size, (self.draws,), generator=gen)
        done = 0 if self.progress is None else self.progress() - self.epoch * self.steps_per_epoch
        return (int(i) for i in order[max(0, done) * self.per_batch:])


def fine_tuning_count(available: int, num_images: Optional[int], split: str, name: str) -> int:
    """How many images of the split are fine-tuned: `num_images` (null = all of them), checked;
    warns (and uses what there is) when the split holds fewer."""
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int)
                                   or num_images < 1):
        raise UserInputError(f"--joint.num_images must be a positive integer or null (the whole split), "
                             f"got {num_images!r}")
    if available == 0:
        raise UserInputError(f"the fine-tuning split {split!r} of {name!r} holds no images: choose "
                             f"another --joint.split (folders: 'all', 'train' or 'test') or add images")
    if num_images is not None and num_images > available:
        warnings.warn(f"asked for {num_images} images but split {split!r} of {name!r} holds {available}; "
                      f"using {available}", UserWarning, stacklevel=2)
    return available if num_images is None else min(num_images, available)


class JointDataModule(L.LightningDataModule):
    """{'target': (index, image) batches of the fine-tuning set, 'prior': image batches of the
    original training data}; one epoch = one pass over the targets.

    targets: an (index, image) dataset (streaming.Indexed over a split) or an image tensor
    (N, C, H, W) (indices 0..N-1); prior: an image dataset or tensor. Memory: one batch of each,
    plus prior_images()' `reference_images` images once asked for.
    """

    def __init__(self, targets: Dataset | torch.Tensor, prior: Dataset | torch.Tensor, batch_size: int,
                 prior_batch_size: int, seed: int = 0, num_workers: int = 0, reference_images: int = 256):
        super().__init__()
        self.targets = IndexedImages(targets) if isinstance(targets, torch.Tensor) else targets
        self.prior = TensorImages(prior) if isinstance(prior, torch.Tensor) else prior
        if len(self.targets) == 0 or len(self.prior) == 0:
            raise UserInputError(f"joint fine-tuning needs images in both sets, got {len(self.targets)} "
                                 f"to fine-tune and {len(self.prior)} prior (training) images")
        self.batch_size = min(batch_size, len(self.targets))
        self.prior_batch_size, self.seed = prior_batch_size, seed
        self.num_workers, self.reference_images = num_workers, reference_images
        self._reference: Optional[torch.Tensor] = None

    def train_dataloader(self) -> CombinedLoader:
        steps = math.ceil(len(self.targets) / self.batch_size)

        def progress() -> int:
            return 0 if self.trainer is None else self.trainer.global_step
        target = DataLoader(self.targets, batch_size=self.batch_size, num_workers=self.num_workers,
                            sampler=EpochSampler(len(self.targets), self.seed, None, self.batch_size,
                                                 steps, progress))
        prior = DataLoader(self.prior, batch_size=self.prior_batch_size, num_workers=self.num_workers,
                           sampler=EpochSampler(len(self.prior), self.seed + 1, steps * self.prior_batch_size,
                                                self.prior_batch_size, steps, progress))
        return CombinedLoader({"target": target, "prior": prior}, mode="max_size_cycle")

    def prior_images(self, limit: Optional[int] = None) -> torch.Tensor:
        """The first `limit` (default reference_images) prior images, (n, C, H, W): the KID
        reference and the denoising-MSE set. Decoded once and kept."""
        limit = self.reference_images if limit is None else limit
        count = min(limit, len(self.prior))
        if self._reference is None or len(self._reference) < count:
            self._reference = torch.stack([self.prior[i] for i in range(count)])
        return self._reference[:count]

    def target_images(self, indices: Sequence[int]) -> torch.Tensor:
        """The fine-tuning images of these latent indices (positions in the split), (B, C, H, W)."""
        return torch.stack([self.targets.images[int(i)] for i in indices])
