"""Batch model inversion over a streamed dataset, as a LightningModule (paper Algorithms 1 and 2).

Lightning's prediction loop drives it: the DataModule yields (index, image) batches, possibly split
over processes; `predict_step` optimizes one batch's latents to the end (deq/inversion.py) and
returns its results, which InversionWriter writes to one part file per batch. Nothing of the
dataset is held here: memory is one batch's.

Why predict and not fit: the optimized tensors are each batch's own latents, not parameters of
this module, so the Trainer's optimizer configuration and checkpointing cannot hold them; the
batch's Adam lives in its BatchInverter, and resume works per batch (finished batches are
skipped, the unfinished one continues from its partial state file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from deqlit.deq.inversion import BatchInverter, InversionSettings
from deqlit.diffusion.chain import Chain
from deqlit.guards import atomic_torch_save
from deqlit.lit.inversion_figures import grid_inputs, inversion_picture, picture_tensor
from deqlit.lit.inversion_outputs import RESTORATION_KEYS, partial_path
from deqlit.parallel.mesh import TimeMesh
from deqlit.deq.reduce import LOCAL, LocalReducer


# Per-image metrics (inversion_outputs.per_image_metrics) whose running means are logged.
RUNNING_MEANS = ("psnr", "initial_psnr", "ssim", "exact_loss", "latent_autocorrelation",
                 "latent_kurtosis", "exact_solve_network_evals", "exact_solve_residual",
                 *RESTORATION_KEYS)       # the restoration scores: only a restoration task has them


class InversionModule(L.LightningModule):
    """Inverts (index, image) batches with a frozen noise network.

    model: eps network forward(x, t); chain: the DDIM chain; settings: what decides the latents;
    state_dir: where partial batch states go (None: no resume); save_every: steps between them.
    """

    def __init__(self, model: nn.Module, chain: Chain, settings: InversionSettings,
                 max_batch: Optional[int] = None, state_dir: Optional[Path] = None,
                 save_every: int = 10, log_every: int = 1):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.chain, self.settings = chain, settings.validate()
        self.max_batch, self.state_dir = max_batch, state_dir
        self.save_every, self.log_every = max(1, save_every), max(1, log_every)
        self.current: Optional[BatchInverter] = None
        self.steps_done = 0          # optimization steps on this process, the logging x-axis
        self.batches_logged = 0
        self.images_done = 0         # images finished on this process, the x-axis of running means
        self.running_sums: dict[str, float] = {}
        self.running_counts: dict[str, int] = {}
        self._reducer: Optional[LocalReducer] = None

    # ---- time sharding (the ddp_time strategy) ----------------------------------------------
    @property
    def mesh(self) -> Optional[TimeMesh]:
        trainer = self._trainer
        return None if trainer is None else getattr(trainer.strategy, "mesh", None)

    def time_reducer(self) -> LocalReducer:
        """The reducer of this process's time group (LOCAL without time shards): the processes of
        a data replica hold the same images and split each chain's T rows."""
        mesh = self.mesh
        if mesh is None or mesh.time == 1:
            return LOCAL
        if self._reducer is None:
            self._reducer = mesh.time_reducer()
        return self._reducer

    @property
    def writes_outputs(self) -> bool:
        """One process per data replica (time shard 0) writes part and partial files."""
        mesh = self.mesh
        return mesh is None or mesh.time_index == 0

    @property
    def method(self) -> str:
        return self.settings.method

    # ---- one batch ------------------------------------------------------------------------
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        indices, images = batch
        dtype = next(self.model.parameters()).dtype
        inverter = BatchInverter(self.model, self.chain, images.to(dtype), indices.tolist(),
                                 self.settings, self.max_batch, self.time_reducer())
        self.resume_batch(inverter)
        self.current = inverter
        while not inverter.finished:
            loss = inverter.step()
            self.steps_done += 1
            if self.steps_done % self.log_every == 0:
                self.log_step(inverter, loss)
            if inverter.step_index % self.save_every == 0 and not inverter.finished:
                self.save_partial()
        result = inverter.result()
        self.current = None
        return result

    def resume_batch(self, inverter: BatchInverter) -> None:
        """Continue from the batch's partial state when one was saved for exactly these images."""
        if self.state_dir is None:
            return
        path = partial_path(self.state_dir, inverter.indices[0])
        if not path.is_file():
            return
        from deqlit.lit.inversion_outputs import read_result
        state = read_result(path)
        if [int(i) for i in state["indices"]] == inverter.indices:
            inverter.load_state_dict(state)
        # Another batching (e.g. another world size): restart the batch; results are per image.

    def save_partial(self, on_error: bool = False) -> Optional[Path]:
        """Write the unfinished batch's state (also called on an interrupt: on_error); returns the
        path. With time shards the state joins every shard's rows (a collective), which a failed
        peer would never join: on an error the last periodic state stays the one to resume from."""
        if self.state_dir is None or self.current is None or self.current.step_index == 0:
            return None
        sharded = self.time_reducer().shards > 1
        if on_error and sharded:
            return None
        state = self.current.state_dict()
        if not self.writes_outputs:
            return None
        path = partial_path(self.state_dir, self.current.indices[0])
        atomic_torch_save(state, path)
        return path

    # ---- logs: through the logger interface, so any Lightning logger receives them ----------
    def log_step(self, inverter: BatchInverter, loss: torch.Tensor) -> None:
        if self.logger is None:
            return
        metrics = {f"{self.method}/loss_mean": float(loss.mean()),
                   f"{self.method}/active_images": float(inverter.active.sum())}
        if self.method == "deq":
            metrics["deq/solver_iterations"] = float(inverter.iterations_history[:, inverter.step_index - 1].mean())
        self.logger.log_metrics(metrics, step=self.steps_done)
        bar = getattr(self.trainer, "progress_bar_callback", None)
        if bar is not None and getattr(bar, "predict_progress_bar", None) is not None:
            bar.predict_progress_bar.set_postfix(step=inverter.step_index, loss=f"{metrics[f'{self.method}/loss_mean']:.3g}")

    def log_batch_result(self, result: dict[str, Any]) -> None:
        """Running means over the images done so far on this process (the x-axis: images done, so
        that a dataset-scale run draws one curve however its batches fall), and for the first batch
        the labelled grid of grid.png (target | initial | final | latent x_T; a restoration:
        target | degraded input | restored | latent x_T)."""
        if self.logger is None:
            return
        per_image = result["metrics"]
        for m in per_image:       # one point per image: a one-batch run still draws a curve
            for key in RUNNING_MEANS:
                if m.get(key) is not None:
                    self.running_sums[key] = self.running_sums.get(key, 0.0) + float(m[key])
                    self.running_counts[key] = self.running_counts.get(key, 0) + 1
            self.images_done += 1
            summary = {f"running/mean_{key}": self.running_sums[key] / self.running_counts[key]
                       for key in RUNNING_MEANS if self.running_counts.get(key)}
            self.logger.log_metrics(summary, step=self.images_done)
        experiment = getattr(self.logger, "experiment", None)
        if self.batches_logged == 0 and hasattr(experiment, "add_image"):
            picture = inversion_picture(**{**grid_inputs(result, per_image, self.method, self.chain.T),
                                           "title": ""})
            experiment.add_image("inversion/grid", picture_tensor(picture), self.images_done)
        self.batches_logged += 1
