"""Batch model inversion over a streamed dataset, as a LightningModule (paper Algorithms 1 and 2).

Lightning's prediction loop drives it: the DataModule yields (index, image) batches, possibly split
over processes; `predict_step` optimizes one batch's latents to the end (deq/inversion.py) and
returns its results, which InversionWriter writes to one part file per batch. Nothing of the
dataset is held here: memory is one batch's.

Why predict and not fit: the optimized tensors are each batch's own latents, not parameters of
this module, so the Trainer's optimizer configuration and checkpointing cannot hold them; the
batch's Adam lives in its BatchInverter, and resume works per batch (finished batches are
skipped, the unfinished one continues from its partial state file).

Logs (rank 0, through the logger): at each optimization step {method}/loss_mean, active_images and
deq/solver_iterations, x = the run's steps so far; per finished image the running/mean_* over all
images done, x = images done. Both count the batches that earlier processes finished (read from
their part files), so the curves of a resumed run go on where they stopped. When the last batch is
done, the summary over all part files: {method}/mean_loss_vs_step, exact_solve/* and the image
inversion/grid (grid.png's picture), written once.
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
from deqlit.lit.inversion_figures import (GRID_IMAGES, grid_inputs, inversion_picture, loss_rows, picture_tensor,
                                          solve_curves)
from deqlit.lit.inversion_outputs import (PART_GLOB, RESTORATION_KEYS, join_parts, load_parts, part_path,
                                          partial_path, read_result)
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
                 save_every: int = 10, log_every: int = 1, mask_pixels: Optional[str] = None):
        super().__init__()
        # The digest of the mask file's pixels when the run started (runs/inversion.check_mask):
        # each batch reads the file again, and one painted over mid-run is refused, not used.
        self.mask_pixels = mask_pixels
        self.model = model.requires_grad_(False).eval()
        self.chain, self.settings = chain, settings.validate()
        self.max_batch, self.state_dir = max_batch, state_dir
        self.save_every, self.log_every = max(1, save_every), max(1, log_every)
        self.current: Optional[BatchInverter] = None
        self.steps_done = 0          # optimization steps this process ran
        # The logs' x-axes count the whole run, the batches of earlier processes (--resume) and of
        # the other processes included: a resumed run's curves go on where they stopped.
        self.steps_before = 0        # steps of the finished batches; x of the per-step scalars: + the batch's step
        self.images_done = 0         # images of the finished batches, the x-axis of the running means
        self.running_sums: dict[str, float] = {}
        self.running_counts: dict[str, int] = {}
        self.counted: set[str] = set()   # the part files (names) counted in the above
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

    def check_mask_unchanged(self, inverter: BatchInverter, indices: list[int]) -> None:
        """Refuse a batch whose mask file no longer holds the pixels the run started with."""
        mask = inverter.degradation.mask
        if self.mask_pixels is None or mask is None:
            return
        from deqlit.deq.degradations import mask_digest
        from deqlit.guards import UserInputError
        if mask_digest(mask[:1].cpu()) != self.mask_pixels:
            raise UserInputError(
                f"the mask file {self.settings.mask} changed during the run (found at the batch of "
                f"images {indices[0]}..{indices[-1]}): the finished batches used the mask it held at "
                f"the start; put that mask back and resume, or start a new run (--out) with the new one")

    # ---- one batch ------------------------------------------------------------------------
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        indices, images = batch
        dtype = next(self.model.parameters()).dtype
        inverter = BatchInverter(self.model, self.chain, images.to(dtype), indices.tolist(),
                                 self.settings, self.max_batch, self.time_reducer())
        self.check_mask_unchanged(inverter, indices.tolist())
        self.resume_batch(inverter)
        self.current = inverter
        while not inverter.finished:
            loss = inverter.step()
            self.steps_done += 1
            if self.run_step(inverter) % self.log_every == 0:
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
    def run_step(self, inverter: BatchInverter) -> int:
        """The x of the per-step scalars: the steps of the run's finished batches + this batch's."""
        return self.steps_before + inverter.step_index

    def logs_run(self) -> bool:
        """Whether this process writes the run's logs: rank 0 (loggers write there only)."""
        return self.logger is not None and self.state_dir is not None and self.trainer.is_global_zero

    def on_predict_start(self) -> None:
        """The batches finished before this process started (--resume) count in the x-axes and
        the running means; their points were logged by the processes that ran them."""
        if self.logs_run():
            self.count_parts(log=False)

    def log_step(self, inverter: BatchInverter, loss: torch.Tensor) -> None:
        if self.logger is None:
            return
        metrics = {f"{self.method}/loss_mean": float(loss.mean()),
                   f"{self.method}/active_images": float(inverter.active.sum())}
        if self.method == "deq":
            metrics["deq/solver_iterations"] = float(inverter.iterations_history[:, inverter.step_index - 1].mean())
        self.logger.log_metrics(metrics, step=self.run_step(inverter))
        bar = getattr(self.trainer, "progress_bar_callback", None)
        if bar is not None and getattr(bar, "predict_progress_bar", None) is not None:
            bar.predict_progress_bar.set_postfix(step=inverter.step_index, loss=f"{metrics[f'{self.method}/loss_mean']:.3g}")

    def log_batch_result(self, result: dict[str, Any]) -> None:
        """Running means over all images done so far in the run, one point per image (x: images
        done, so that a dataset-scale run draws one curve however its batches fall), after a batch
        is written: this batch's images, then those the other processes finished meanwhile."""
        if not self.logs_run():
            return
        self.count_batch(part_path(self.state_dir, int(result["indices"][0])).name, result, log=True)
        if self.trainer.world_size > 1:
            self.count_parts(log=True)

    def count_parts(self, log: bool) -> None:
        """Count the part files on disk not counted yet (logging their running means if `log`)."""
        for path in sorted(self.state_dir.glob(PART_GLOB)):
            if path.name not in self.counted:
                self.count_batch(path.name, read_result(path), log)

    def count_batch(self, name: str, part: dict[str, Any], log: bool) -> None:
        self.counted.add(name)
        self.steps_before += int(part["steps"])
        for m in part["metrics"]:
            for key in RUNNING_MEANS:
                if m.get(key) is not None:
                    self.running_sums[key] = self.running_sums.get(key, 0.0) + float(m[key])
                    self.running_counts[key] = self.running_counts.get(key, 0) + 1
            self.images_done += 1
            if log:
                self.logger.log_metrics({f"running/mean_{key}": self.running_sums[key] / self.running_counts[key]
                                         for key in RUNNING_MEANS if self.running_counts.get(key)},
                                        step=self.images_done)

    def on_predict_end(self) -> None:
        """The run's summary when its last batch is done (an interrupted process writes none; a
        finished run extended with more images writes it again, over all of them, at the same
        steps: TensorBoard's data server keeps the last value written at a step). Here rather
        than after Trainer.predict: Lightning closes the logger at its end, and a later write
        would open a second event file."""
        self.trainer.strategy.barrier()      # every process's part files are written
        if self.logs_run():
            log_run_summary(self.logger, self.state_dir, self.method, self.chain.T)


def log_run_summary(logger: Any, folder: Path, method: str, T: int) -> None:
    """What the run's part files in `folder` show over all its images, written once at its end:
    {method}/mean_loss_vs_step, the mean loss at each optimization step counted from 1 (as
    {method}/loss_mean and curves.png count them); the exact solve's curves (log_solve_curves); and
    the image inversion/grid, grid.png's labelled grid, at x = the number of images in the run."""
    parts = load_parts(folder)
    if not parts:
        return
    rows = loss_rows([p["loss_history"] for p in parts])
    for step, value in enumerate(torch.nanmean(rows, 0).tolist(), start=1):
        if value == value:   # not NaN: some image took this step
            logger.log_metrics({f"{method}/mean_loss_vs_step": value}, step=step)
    log_solve_curves(logger, solve_curves([p.get("exact_report") for p in parts]))
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):
        images = sorted((m for p in parts for m in p["metrics"]), key=lambda m: m["index"])
        shown = {m["index"] for m in images[:GRID_IMAGES]}          # the rows of grid.png
        merged = join_parts([p for p in parts if shown & set(p["indices"].tolist())])
        rows_metrics = [m for m in images if m["index"] in set(merged["indices"].tolist())]
        picture = inversion_picture(**grid_inputs(merged, rows_metrics, method, T))
        experiment.add_image("inversion/grid", picture_tensor(picture), len(images))


def log_solve_curves(logger: Any, solve: dict[str, Any]) -> None:
    """The exact inverse solve (method exact or init exact), the worst image of all batches:
    exact_solve/worst_residual_by_iteration (per step: the worst state at each iteration of the
    states' own solves; all timesteps: all states after each shared call), and per state i (the
    step) its last residual and, per step, the iterations its solve took."""
    if not solve:
        return
    trace = solve["state_trace"]                                   # (T, calls), NaN after a stop
    worst = solve["call_trace"] if len(solve["call_trace"]) else \
        torch.nan_to_num(trace, nan=-1.0).amax(0)
    for n, value in enumerate(worst.tolist(), start=1):
        if value >= 0:
            logger.log_metrics({"exact_solve/worst_residual_by_iteration": value}, step=n)
    for i, row in enumerate(trace, start=1):
        done = row[torch.isfinite(row)]
        if len(done):
            values = {"exact_solve/final_residual_by_state": float(done[-1])}
            if solve["mode"] == "per-step":
                values["exact_solve/iterations_by_state"] = float(len(done))
            logger.log_metrics(values, step=i)
