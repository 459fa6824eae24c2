"""Sample-quality metrics during training: every N steps, samples from the EMA model against the
training images, logged to every logger (TensorBoard) as metrics/<name>.

The distances are torchmetrics objects (deqlit.evaluation.ImageMetrics), so with several processes
each one embeds its share of the reference images and of the samples and `compute()` pools the
statistics over `process_group` (None = all processes; a run that shards the timesteps of one chain
over processes passes its data-parallel group, so that one image is not counted once per shard).
Sample i always starts from the noise of seed (seed + i): the figures do not depend on how many
processes share the work.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from deqlit.diffusion.chain import Chain
from deqlit.evaluation import ImageMetrics, parse_metric_names
from deqlit.evaluation.metrics import load_reference
from deqlit.sampling import generate


def shard(count: int, rank: int, world: int) -> range:
    """The item indices of `rank` out of `count` when `world` processes share them round-robin."""
    return range(rank, count, world)


class SampleMetrics(Callback):
    """Logs metrics/<name> (fid, kid, fd-random, kd-random) every `every_n_steps` training steps.

    Args: reference (N, C, H, W) images in [-1, 1], names, every_n_steps, num_samples, timesteps
    and solver of the sampling chain, fid_weights (the Inception file, only for fid/kid), seed,
    batch_size (images per generate call), process_group.
    """

    def __init__(self, reference: torch.Tensor, names: str | Sequence[str], every_n_steps: int,
                 num_samples: int, timesteps: int, solver: str, fid_weights: Optional[str] = None,
                 seed: int = 0,
                 batch_size: int = 32, process_group: Optional[Any] = None,
                 solver_options: Optional[dict[str, Any]] = None):
        self.names = parse_metric_names(names)
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"metrics need every_n_steps >= 1 and num_samples >= 2, got "
                             f"{every_n_steps} and {num_samples}")
        self.reference, self.every_n_steps, self.num_samples = reference, every_n_steps, num_samples
        self.timesteps, self.solver, self.seed, self.batch_size = timesteps, solver, seed, batch_size
        self.fid_weights, self.process_group = fid_weights, process_group
        self.solver_options = dict(solver_options or {})
        self.metrics: Optional[ImageMetrics] = None
        self.last: dict[str, Any] = {}

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Built here (the module is on its device by now) so that a missing weights file fails
        # before step 1, and the reference features are computed once per run.
        self.metrics = ImageMetrics(self.names, self.reference.shape[1], self.fid_weights,
                                    kid_subset_size=min(1000, self.num_samples),
                                    process_group=self.process_group).to(pl_module.device)
        rank, world = self._rank_world()
        mine = self.reference[list(shard(len(self.reference), rank, world))]
        for chunk in mine.split(self.batch_size):
            self.metrics.update(chunk, real=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps:
            return
        values = self.measure(pl_module)
        scalars = {f"metrics/{k}": v for k, v in values.items() if isinstance(v, float)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """Samples from pl_module.ema.module (or .model) -> the metric values (synced)."""
        assert self.metrics is not None, "setup() builds the metrics"
        net = pl_module.ema.module if hasattr(pl_module, "ema") else pl_module.model
        was_training = net.training
        net.eval()
        chain = Chain.build(pl_module.abar, self.timesteps)
        rank, world = self._rank_world()
        indices = list(shard(self.num_samples, rank, world))
        shape = (net.in_channels, net.resolution, net.resolution)
        self.metrics.reset(real=False)
        for start in range(0, len(indices), self.batch_size):
            ids = indices[start:start + self.batch_size]
            x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + i))
                               for i in ids]).to(pl_module.device)
            images, _ = generate(net, x_T, chain, self.solver, **self.solver_options)
            self.metrics.update(images.clamp(-1, 1), real=False)
        net.train(was_training)
        self.last = self.metrics.compute(seed=self.seed)
        return self.last


def metrics_callbacks(cfg: dict) -> list[Callback]:
    """[SampleMetrics] when train.metrics_every > 0, else []. Keys: train.metrics_every,
    train.metrics (names), train.metrics_count, train.sample_timesteps, train.sample_solver,
    evaluation.fid_weights."""
    train = cfg["train"]          # resolved (deqlit.runs.sections): every key is there
    every = train["metrics_every"] or 0
    if every <= 0:
        return []
    data = cfg["data"]
    reference = load_reference(data["name"], "train", data["resolution"], data["channels"],
                               data["root"], limit=cfg["evaluation"]["ref_limit"])
    # sample_timesteps / sample_solver: DiffusionTrainModule's arguments (one default, there)
    return [SampleMetrics(reference, train["metrics"], every, num_samples=train["metrics_count"],
                          timesteps=train["sample_timesteps"], solver=train["sample_solver"],
                          fid_weights=cfg["evaluation"]["fid_weights"], seed=train["seed"])]
