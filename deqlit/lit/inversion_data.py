"""The DataModule of an inversion run: the first `num_images` images of a split, as (index, image)
batches, without the images whose results are already on disk (a resumed run)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset

from deqlit.data.streaming import Indexed, split_dataset


class InversionDataModule(L.LightningDataModule):
    """Serves images lazily: memory holds one batch whatever the dataset's size.

    Under DDP each process (under ddp_time each data replica) takes every world_size-th image (this module splits them, not
    Lightning's sampler, which cannot give a process no image); since every image's result depends
    on that image alone, any split gives the same latents.
    """

    def __init__(self, name: str, split: str, resolution: int, channels: int, root: str | Path = "data",
                 num_images: Optional[int] = None, batch_size: int = 16, num_workers: int = 0,
                 skip: Iterable[int] = ()):
        super().__init__()
        self.name, self.split, self.resolution, self.channels = name, split, resolution, channels
        self.root, self.num_images, self.batch_size = root, num_images, batch_size
        self.num_workers, self.skip = num_workers, set(skip)
        self.images: Optional[Dataset] = None
        self.positions: list[int] = []

    def setup(self, stage: Optional[str] = None) -> None:
        if self.images is None:
            self.images = split_dataset(self.name, self.split, self.resolution, self.channels, self.root)
            total = len(self.images)
            wanted = total if self.num_images is None else min(self.num_images, total)
            if self.num_images is not None and total < self.num_images:
                warnings.warn(f"asked for {self.num_images} images but split {self.split!r} of "
                              f"{self.name!r} holds {total}; inverting {total}", UserWarning, stacklevel=2)
            self.positions = [i for i in range(wanted) if i not in self.skip]

    def predict_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        mesh = getattr(trainer.strategy, "mesh", None) if trainer is not None else None
        if mesh is not None:      # ddp_time: split over the data replicas; a replica's time shards share
            rank, world = mesh.data_index, mesh.data
        return DataLoader(Indexed(self.images, self.positions[rank::world]), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers)
