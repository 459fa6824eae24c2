"""The LightningDataModule: `--data NAME` -> train / held-out image tensors in [-1, 1]."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from deqlit.data.registry import load_images


class ImageDataModule(L.LightningDataModule):
    """Serves a dataset by name (see deqlit.data.registry) as (image,) batches.

    Training draws `steps_per_epoch * batch_size` images with replacement per epoch, so that tiny
    datasets (84 faces) still give epochs long enough for periodic validation and checkpoints.
    """

    def __init__(self, name: str = "faces", resolution: int = 32, channels: int = 1,
                 batch_size: int = 32, root: str = "data", steps_per_epoch: int = 250,
                 eval_split: str = "test", num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_images: torch.Tensor | None = None
        self.eval_images: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_images is None:
            self.train_images = load_images(hp.name, "train", hp.resolution, hp.channels, hp.root)
            self.eval_images = load_images(hp.name, hp.eval_split, hp.resolution, hp.channels, hp.root)

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(self.train_images)
        sampler = RandomSampler(data, replacement=True,
                                num_samples=self.hparams.steps_per_epoch * self.hparams.batch_size)
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.eval_images), batch_size=self.hparams.batch_size,
                          shuffle=False, num_workers=self.hparams.num_workers)
