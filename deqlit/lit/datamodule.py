"""The LightningDataModule of train.py: `--data NAME` -> (image,) batches in [-1, 1], streamed.

On-disk sets (CelebA, LSUN, CIFAR-10, folder:PATH) are read through
deqlit.data.streaming.split_dataset, which decodes an image when the DataLoader asks for it, so
memory does not grow with the dataset (CelebA would be ~8 GB as float32, LSUN cannot fit at all);
the bundled sets (faces, digits) are small and stay in memory.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from deqlit.data.streaming import split_dataset


class AsTuple(Dataset):
    """Item i of `images` as the 1-tuple (image,): the batch layout DiffusionTrainModule reads."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.images[i],)


class ImageDataModule(L.LightningDataModule):
    """Serves a dataset by name (see deqlit.data.streaming) as (image,) batches, image (B, C, H, W).

    Training draws `steps_per_epoch * batch_size` images with replacement per epoch, so that tiny
    datasets (84 faces) still give epochs long enough for periodic validation and checkpoints, and
    huge ones need no full pass before the first validation. Validation reads the first
    `val_images` images of `eval_split` (None: all of them), the same ones every epoch.
    """

    def __init__(self, name: str = "faces", resolution: int = 32, channels: int = 1,
                 batch_size: int = 32, root: str = "data", steps_per_epoch: int = 250,
                 eval_split: str = "test", num_workers: int = 0,
                 val_images: Optional[int] = 1024):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Optional[Dataset] = None
        self.eval_set: Optional[Dataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Lists the files (and decodes one image per split, so that a wrong path or format fails
        here, before any compute); idempotent, so run_training may call it before fit does."""
        hp = self.hparams
        if self.train_set is None:
            self.train_set = split_dataset(hp.name, "train", hp.resolution, hp.channels, hp.root)
            evals = split_dataset(hp.name, hp.eval_split, hp.resolution, hp.channels, hp.root)
            if hp.val_images is not None and hp.val_images < len(evals):
                evals = Subset(evals, range(hp.val_images))
            self.eval_set = evals

    def train_dataloader(self) -> DataLoader:
        data = AsTuple(self.train_set)
        sampler = RandomSampler(data, replacement=True,
                                num_samples=self.hparams.steps_per_epoch * self.hparams.batch_size)
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(AsTuple(self.eval_set), batch_size=self.hparams.batch_size,
                          shuffle=False, num_workers=self.hparams.num_workers)
