"""The LightningDataModule of train.py: `--data NAME` -> (image,) batches in [-1, 1], streamed.

On-disk sets (CelebA, LSUN, CIFAR-10, folder:PATH) are read through
deqlit.data.streaming.split_dataset, which decodes an image when the DataLoader asks for it, so
memory does not grow with the dataset (CelebA would be ~8 GB as float32, LSUN cannot fit at all);
the bundled sets (faces, digits) are small and stay in memory.

The training images are a stream of global batches, batch s a function of (seed, s) only
(StepStream), so a resumed run (train.py --resume) reads what an uninterrupted one would.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from deqlit.data.streaming import split_dataset
from deqlit.lit.joint_data import EpochSampler


def data_share(trainer: Any) -> tuple[int, int]:
    """(rank, replicas): this process's place among the data replicas that split each global
    batch, as Lightning splits data (its distributed_sampler_kwargs: DDP's world, ddp_time's data
    group); (0, 1) on one device or without a Trainer."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    return (int(kwargs["rank"]), int(kwargs["num_replicas"])) if kwargs else (0, 1)


class StepStream(DistributedSampler):
    """This process's images of a stream of global batches (batch_size x replicas images each):
    global batch s is a function of (seed, s) only, and rank r takes its r-th `batch_size` slice.

    The draws are joint fine-tuning's EpochSampler: `steps_per_epoch` global batches, with
    replacement, per (seed, epoch). Which epoch, and how many of its batches are done, come from
    `done()` (batches trained, from the restored global step) when an iterator starts, not from
    set_epoch: Lightning builds a resumed fit's first iterator before it calls set_epoch (with
    num_workers > 0 the indices are drawn right then), and restarts a resumed epoch's order from its
    beginning (no skipping: the loader has no state). Reading the step makes both right.

    A DistributedSampler by type only (its shuffle and seed are unused): under DDP Lightning wraps
    any other sampler in one, whose reshuffled, padded split of each epoch could not skip by step.
    """

    def __init__(self, size: int, batch_size: int, steps_per_epoch: int, seed: int, rank: int = 0,
                 replicas: int = 1, done: Callable[[], int] = lambda: 0):
        super().__init__(range(size), num_replicas=replicas, rank=rank, shuffle=False, seed=seed)
        self.batch_size, self.steps_per_epoch, self.done = batch_size, steps_per_epoch, done
        self.order = EpochSampler(size, seed, steps_per_epoch * batch_size * replicas,
                                  batch_size * replicas, steps_per_epoch, done)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows the global step (see the class)."""

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rest = torch.tensor(list(self.order), dtype=torch.long)      # the epoch's global batches left
        mine = rest.view(-1, self.num_replicas, self.batch_size)[:, self.rank]
        return iter(mine.reshape(-1).tolist())


class StepLoader(DataLoader):
    """A DataLoader whose position needs no saving: StepStream reads it from the global step.
    Having a (empty) state_dict makes it resumable to Lightning, which otherwise warns on every
    resume in the middle of an epoch that the results may be unreliable."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see the class)."""


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

    Training draws `steps_per_epoch * batch_size` images with replacement per epoch and process
    (StepStream), so that tiny datasets (84 faces) still give epochs long enough for periodic
    validation and checkpoints, and huge ones need no full pass before the first validation; seed
    None is the one L.seed_everything was given (PL_GLOBAL_SEED, what Lightning's own
    DistributedSampler uses). Validation reads the first `val_images` images of `eval_split` (None:
    all of them), the same ones every epoch.
    """

    def __init__(self, name: str = "faces", resolution: int = 32, channels: int = 1,
                 batch_size: int = 32, root: str = "data", steps_per_epoch: int = 250,
                 eval_split: str = "test", num_workers: int = 0,
                 val_images: Optional[int] = 1024, seed: Optional[int] = None):
        super().__init__()
        if seed is None:   # read now: the value the module's seed has too (Lightning merges hparams)
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
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

    def batches_done(self) -> int:
        """Training batches done by this run, restored ones included (0 before fit)."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = AsTuple(self.train_set)
        rank, replicas = data_share(self.trainer)
        sampler = StepStream(len(data), hp.batch_size, hp.steps_per_epoch, hp.seed, rank, replicas,
                             self.batches_done)
        return StepLoader(data, batch_size=hp.batch_size, sampler=sampler,
                          num_workers=hp.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(AsTuple(self.eval_set), batch_size=self.hparams.batch_size,
                          shuffle=False, num_workers=self.hparams.num_workers)
