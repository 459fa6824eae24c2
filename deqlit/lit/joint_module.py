"""Joint fine-tuning of the noise network and per-image latents through the DEQ (the paper's
future work): every image i of a set gets a latent x_T^(i) whose DDIM chain regenerates it, while
the network adapts so that these latents stay typical N(0, I) noise and the model stays a
diffusion model for everything else.

Loss per batch (images x0, latents x_T):
    ||DEQ(x_T)_0 - x0||_F^2                      reconstruction through the DEQ (paper's loss), per image
  + prior_weight * E ||eps - eps_theta(x_t, t)||_F^2  prior preservation on the original training data,
                                                  per image like the reconstruction (a per-pixel mean
                                                  would be ~D times weaker, and the model drifts)
  + typicality_weight * chi2(x_T)                 the latent's whiteness statistics, per image
Typicality by design: a latent is parameterized on the sphere of radius sqrt(D), where white
Gaussian noise lives (x_T = sqrt(D) z / ||z||, the table row z renormalized after each step), and
chi2 sums the squared z-scores of the statistics that white noise pins down and the sphere does
not: lag-1 autocorrelation along rows and columns (std 1/sqrt(n_pairs)), kurtosis (std
sqrt(24 / D)) and the mean (std 1 / sqrt(D)). For N(0, I) latents chi2 is about 4 (4 degrees of
freedom); the exact latents of held-out faces (autocorrelation ~0.47) score ~450.

Latents for a dataset of any size: a table (N, D) updated only at the rows of the batch. Its
gradient is sparse (embedding with sparse=True) and RowAdam keeps a step count per row, so the
bias correction is right for a row first seen at step 10,000 (torch's SparseAdam counts one step
per table). Rows are initialized when first seen (Gaussian from seed * 1_000_003 + index, or DDIM
inversion of the image), so results do not depend on batching. Two optimizers (RowAdam for the
latents, AdamW for the network) run under manual optimization; the network's is stepped through
its raw optimizer, so the Trainer's global_step counts training steps, not optimizer calls.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from deqlit.deq.blocks import x0_objective
from deqlit.deq.degradations import frobenius_loss
from deqlit.deq.grad import adjoint_settings, attach_gradient, check_grad_mode
from deqlit.deq.inversion import INITS, canonical_init
from deqlit.deq.jacobian_table import keep_tables, measured_tables
from deqlit.deq.layer import DEQSampler
from deqlit.deq.solvers import SolverStats, get_solver
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelation, typicality_chi2
from deqlit.diffusion.seeds import gaussian_latent
from deqlit.diffusion.sequential import ddim_encode, ddim_sample
from deqlit.lit.ema import make_ema, update_ema
from deqlit.guards import NonFiniteError, UserInputError
from deqlit.lit.latent_table import LatentTable, RowAdam, grow_saved_rows
from deqlit.parallel.mesh import LocalMesh, TimeMesh

# The module's tensors that DDP must not touch: the latents are reduced by row (reduce_latent_rows).
DDP_IGNORED = ["latents.weight", "latents.ready"]
LR_DECAYS = ("none", "linear", "cosine")


def decay_factor(progress: float, shape: str, final: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of a run: 1 at the start, `final` at the end.

    Why decay at all: with a constant rate the last steps jitter the latents by ~lr per coordinate
    and the raw network oscillates around the fit (its EMA scored 2.3 dB above it); annealing to a
    small rate lets both settle where the run ends."""
    p = min(max(float(progress), 0.0), 1.0)
    if shape == "none":
        return 1.0
    if shape == "linear":
        return 1.0 - (1.0 - final) * p
    if shape == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown lr_decay {shape!r}; use one of {LR_DECAYS}")


# ---- the LightningModule ---------------------------------------------------------------------
class JointFineTuneModule(L.LightningModule):
    """Fine-tunes `model` (network_lr > 0; 0 = latents only) and the latents of `num_images` images.

    Batches: {'target': (index (B,), image (B, C, H, W)), 'prior': image (B', C, H, W)} (run_joint's
    JointDataModule). The EMA copy (self.ema) is what run_joint exports.
    """

    def __init__(self, model: nn.Module, schedule_abar: torch.Tensor, num_images: int,
                 image_shape: tuple[int, ...], timesteps: int = 10, skip: str = "uniform",
                 grad: str = "onestep", tau: float = 0.1, solver: str = "triangular-anderson",
                 solver_options: Optional[dict[str, Any]] = None, adjoint: Optional[dict[str, Any]] = None,
                 max_batch: Optional[int] = None, latent_lr: float = 0.05, network_lr: float = 1e-5,
                 weight_decay: float = 0.0, warmup_steps: int = 0, lr_decay: str = "none",
                 lr_final: float = 0.05, grad_clip: float = 1.0,
                 ema_decay: float = 0.995, prior_weight: float = 1.0, typicality_weight: float = 1.0,
                 sphere: bool = True, init: str = "gaussian", seed: int = 0, compare_every: int = 0,
                 image_every: int = 50, kid_every: int = 0, kid_samples: int = 32,
                 latents_store: Optional[Any] = None):
        super().__init__()
        # latents_store: latent_store.DiskLatentStore, the table in memory-mapped files (or None)
        self.save_hyperparameters(ignore=["model", "schedule_abar", "latents_store"])
        init = self.hparams.init = canonical_init(init)
        if init not in INITS:
            raise ValueError(f"unknown latent init {init!r}; use one of {INITS}")
        if network_lr < 0 or prior_weight < 0 or typicality_weight < 0:
            raise ValueError("network_lr, prior_weight and typicality_weight must be >= 0")
        if lr_decay not in LR_DECAYS or not 0 <= lr_final <= 1:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS} and lr_final in [0, 1], got "
                             f"{lr_decay!r} and {lr_final}")
        self.automatic_optimization = False
        self.model = model
        self.train_network = network_lr > 0
        self.model.requires_grad_(self.train_network)
        self.ema = make_ema(self.model)
        self.register_buffer("abar", schedule_abar.detach().to(torch.float64).clone(), persistent=False)
        self.chain = Chain.build(self.abar, timesteps, skip)
        self.latents = LatentTable(num_images, image_shape, sphere, latents_store)
        get_solver(solver)
        check_grad_mode(grad, tau)
        self.adjoint = adjoint_settings(adjoint)
        # data replicas x time shards: one process until setup finds ddp_time's mesh
        self.mesh: LocalMesh | TimeMesh = LocalMesh()
        # The run's progress in [0, 1] for lr_decay: global_step / max_steps unless a budget
        # callback (run_joint's ProcessTimeBudget) sets a clock of its own; the larger one counts.
        self.progress_clock: Optional[Callable[[], float]] = None

    # ---- the DEQ ------------------------------------------------------------------------
    def solve_chain(self, x_T: torch.Tensor) -> tuple[torch.Tensor, DEQSampler, SolverStats]:
        """x_T (B, C, H, W) -> (this time shard's block of X with the chosen gradient attached, the
        sampler (its block, last map and solution), forward stats); X (rows, B, C, H, W), X[0] = x_0
        on the block that holds it (one process: all T rows)."""
        hp = self.hparams
        deq = DEQSampler(self.model, self.chain, hp.solver, hp.solver_options, grad=hp.grad, tau=hp.tau,
                         max_batch=hp.max_batch, adjoint=self.adjoint, reducer=self.mesh.time_reducer())
        deq.backward_stats = None
        X, stats = deq(x_T)
        # Its backward_stats are read after backward (ift). Kept out of the module's children: as
        # a submodule its copy of the network would enter every checkpoint (and fail a resume).
        self.__dict__["_deq_of_step"] = deq
        return X, deq, stats

    @property
    def backward_stats(self) -> Optional[SolverStats]:
        deq = getattr(self, "_deq_of_step", None)
        return None if deq is None else deq.backward_stats

    def train(self, mode: bool = True) -> "JointFineTuneModule":
        """The network stays in eval mode: dropout would make the fixed-point map random."""
        super().train(mode)
        self.model.eval()
        return self

    # ---- latents ------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_rows(self, index: torch.Tensor, images: torch.Tensor) -> None:
        """Fill the rows of `index` seen for the first time (Gaussian, DDIM or exact inversion)."""
        new = ~self.latents.is_ready(index)
        if not bool(new.any()):
            return
        idx, x0 = index[new], images[new]
        if self.hparams.init == "gaussian":
            values = torch.stack([gaussian_latent(self.hparams.seed, int(i), x0.shape[1:], x0.dtype)
                                  for i in idx.tolist()]).to(x0.device)
        elif self.hparams.init == "ddim-inversion":
            values = ddim_encode(self.model, x0, self.chain)
        else:   # the exact inverse chain (deq/inverse_map.py); an image that misses tol keeps its best
            from deqlit.deq.inverse_map import exact_invert
            values = exact_invert(self.model, x0, self.chain, max_batch=self.hparams.max_batch,
                                  on_fail="return")[0]
        self.latents.fill(idx, values)

    # ---- losses -------------------------------------------------------------------------
    def denoising_loss(self, x0: torch.Tensor, generator: torch.Generator,
                       rows: slice = slice(None)) -> torch.Tensor:
        """DDPM's eps loss at random timesteps, drawn from `generator` (same draw on resume).
        The timesteps and noise are drawn for all of x0 (B, C, H, W), then the loss is taken on
        x0[rows]: a data replica's share of a global batch gets the draws one process would."""
        t = torch.randint(0, len(self.abar), (x0.shape[0],), generator=generator)[rows].to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)[rows].to(x0.device)
        a = self.abar[t].to(x0.dtype)[:, None, None, None]
        return F.mse_loss(self.model(a.sqrt() * x0[rows] + (1 - a).sqrt() * noise, t), noise)

    def step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + 7919 * self.global_step + 1)

    def zeroed_optimizers(self) -> list:
        """Lightning's optimizers as a list (latents first, then the network), gradients zeroed."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        return optimizers

    def setup(self, stage: str) -> None:
        """Under --trainer.strategy ddp_time the strategy's mesh (data replicas x time shards) is in
        place before DDP wraps the module: keep the latents out of DDP (they are reduced by row)."""
        mesh = getattr(self.trainer.strategy, "mesh", None) if self._trainer is not None else None
        if mesh is not None:
            self.mesh = mesh
            self._ddp_params_and_buffers_to_ignore = list(DDP_IGNORED)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One step on this process's data replica and time shard (one process: the whole batch
        and chain).

        Every process loads the whole global batch and initializes all its rows; a replica takes
        its contiguous share of the batch and of the prior batch, whose timesteps and noise are
        drawn for the global batch first, so nothing depends on the world size. The block that
        holds x_0 adds the whole loss, the others backpropagate 0 * sum(X) (blocks.x0_objective).
        Each replica's loss is its share of the global batch's mean times the replicas, so that the
        network's gradient (ddp_time's DDP hook: sum over time, mean over data) and the latents'
        (reduce_latent_rows: the same by row) equal one process's.
        """
        hp, mesh = self.hparams, self.mesh
        step = self.global_step      # the x of this step's curves (Lightning logs before the update)
        index, images = batch["target"]
        prior_all = batch["prior"][0] if isinstance(batch["prior"], (tuple, list)) else batch["prior"]
        index = index.long()
        if len(index) < mesh.data or len(prior_all) < mesh.data:
            raise UserInputError(f"a batch of {len(index)} images (prior {len(prior_all)}) for {mesh.data} "
                                 f"data replicas: raise --joint.batch_size / --joint.prior_batch_size")
        self.initialize_rows(index, images)          # all rows of the global batch, everywhere
        mine, pmine = mesh.data_slice(len(index)), mesh.data_slice(len(prior_all))
        idx, x0 = index[mine], images[mine]
        x_T = self.latents(idx)
        X, deq, stats = self.solve_chain(x_T)
        share = mesh.data * len(idx) / len(index)
        prior_share = mesh.data * (pmine.stop - pmine.start) / len(prior_all)
        pixels = prior_all[0].numel()          # per-image sums, the reconstruction's scale
        train_prior = self.train_network and hp.prior_weight > 0
        terms: dict[str, torch.Tensor] = {}

        def loss_of_x0(x0_hat: torch.Tensor) -> torch.Tensor:
            terms["recon"] = frobenius_loss(x0_hat, x0)             # (B,)
            terms["chi2"] = typicality_chi2(x_T)
            loss = share * (terms["recon"].mean() + hp.typicality_weight * terms["chi2"].mean())
            if train_prior:
                terms["prior"] = self.denoising_loss(prior_all, self.step_generator(), pmine)
                loss = loss + hp.prior_weight * pixels * prior_share * terms["prior"]
            return loss
        objective = x0_objective(X, deq.block, loss_of_x0)
        if not bool(torch.isfinite(mesh.world_sum(objective.detach().reshape(1).double().clone()))):
            raise NonFiniteError(f"joint fine-tuning diverged at step {self.global_step + 1}: the loss "
                                 f"is not finite")
        optimizers = self.zeroed_optimizers()
        self.set_learning_rates(optimizers)
        self.manual_backward(objective)       # the network's gradient: reduced by ddp_time's DDP hook
        rows = reduce_latent_rows(self.latents.weight, index, mesh)
        every = hp.compare_every
        cosine = (self.gradient_cosine(deq, x_T.detach(), x0)       # before the weights move
                  if every and self.global_step % every == 0 else None)
        if self.train_network:
            net_opt = optimizers[1]
            if hp.grad_clip:
                self.clip_gradients(net_opt, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            net_opt.optimizer.step()          # raw: global_step counts the latents' steps only
            update_ema(self.ema, self.model, hp.ema_decay)
        optimizers[0].step()
        self.latents.renormalize(rows)
        # Logging: x_0 of the chain on every shard of the replica; the terms of this replica.
        with torch.no_grad():
            x0_hat = deq.first_state(X).detach()
            recon = frobenius_loss(x0_hat, x0)
            chi2 = typicality_chi2(x_T.detach())
            if "prior" in terms:
                prior_loss = terms["prior"].detach()
            elif self.logged_now():      # frozen network: the curve only, on the steps that are logged
                prior_loss = self.denoising_loss(prior_all, self.step_generator(), pmine)
            else:
                prior_loss = None
        self.log_step(step, x0, x0_hat, x_T.detach(), recon, chi2, prior_loss, stats, idx, cosine)
        return objective.detach()

    # ---- logging ------------------------------------------------------------------------
    @torch.no_grad()
    def log_step(self, step, x0, x0_hat, x_T, recon, chi2, prior_loss, stats, index, cosine) -> None:
        """This step's curves, and its images at the same x (`step`: global_step before the update,
        where Lightning logs the step's values). What has its own period (the gradient cosine, KID,
        the images) goes to the logger at `step` directly: through self.log on a step that
        log_every_n_steps skips, it would appear at the next logged step."""
        rho, kurt = lag1_autocorrelation(x_T), kurtosis(x_T)
        values = {"train/recon_loss": recon.mean(), "train/typicality_chi2": chi2.mean(),
                  "latents/autocorr_mean": rho.mean(),
                  "latents/autocorr_max": rho.abs().max(), "latents/kurtosis_mean": kurt.mean(),
                  "latents/kurtosis_maxdev": (kurt - 3).abs().max(),
                  "train/psnr": peak_signal_noise_ratio(x0_hat.clamp(-1, 1), x0, data_range=2.0),
                  "solver/iterations": float(stats.iterations)}
        if prior_loss is not None:
            values["train/prior_denoise_mse"] = prior_loss
        if self.logged_now():      # a network call of its own: only on the steps that are logged
            values["train/target_denoise_mse"] = self.denoising_loss(x0, self.step_generator())
        if self.hparams.grad == "ift" and self.backward_stats is not None:
            values["solver/adjoint_iterations"] = float(self.backward_stats.iterations)
        periodic = {} if cosine is None else {"grad/cosine_onestep_ift": float(cosine)}
        self.log_dict(values, prog_bar=False, batch_size=len(index))
        self.log("recon", recon.mean(), prog_bar=True, batch_size=len(index), logger=False)
        if self.hparams.image_every and step % self.hparams.image_every == 0:
            self.log_images("reconstructions", torch.cat([x0[:8], x0_hat[:8]]), nrow=min(8, len(x0)),
                            step=step)
        if self.hparams.kid_every and step % self.hparams.kid_every == 0:
            periodic["eval/kid"] = self.fresh_sample_kid(step)
        if periodic and self.logger is not None:      # rank 0 writes (the loggers' log_metrics)
            self.logger.log_metrics(periodic, step=step)
        for name, value in periodic.items():         # and callbacks see them (trainer.callback_metrics)
            self.log(name, value, logger=False, batch_size=1)

    def logged_now(self) -> bool:
        """Whether this step's values reach the logger (the Trainer's log_every_n_steps)."""
        every = getattr(self._trainer, "log_every_n_steps", 1) if self._trainer is not None else 1
        return self.global_step % max(1, every) == 0

    def gradient_cosine(self, deq: DEQSampler, x_T: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Cosine between the onestep and ift gradients of the reconstruction loss to the latents
        at this step's solution X* (the network frozen for this comparison only)."""
        flags = [p.requires_grad for p in self.model.parameters()]
        self.model.requires_grad_(False)
        fmap, X_star = deq.last_map, deq.last_solution
        try:
            grads = []
            with torch.enable_grad():
                for mode in ("onestep", "ift"):
                    leaf = x_T.clone().requires_grad_(True)
                    X = attach_gradient(mode, fmap, X_star, leaf, tau=self.hparams.tau, adjoint=self.adjoint)
                    x0_objective(X, deq.block, lambda x0_hat: frobenius_loss(x0_hat, x0).sum()).backward()
                    deq.reducer.sum_gradients([leaf])           # each time shard's part
                    grads.append(leaf.grad.flatten())
        finally:
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
        return F.cosine_similarity(grads[0], grads[1], dim=0)

    def log_images(self, tag: str, images: torch.Tensor, nrow: int, step: int) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            grid = torchvision.utils.make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow)
            experiment.add_image(tag, grid.float().cpu(), step)

    @torch.no_grad()
    def fresh_sample_kid(self, step: int) -> float:
        """kd-random of `kid_samples` fresh EMA samples (sequential DDIM over the chain) against
        the prior (training) images; fixed x_T, so the curve compares like with like."""
        from deqlit.evaluation import kid
        reference = self.trainer.datamodule.prior_images()
        shape = (self.hparams.kid_samples, *self.latents.image_shape)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(self.hparams.seed + 99)).to(reference)
        samples = ddim_sample(self.ema.module, x_T.to(self.device), self.chain)
        self.log_images("samples", samples[:16], nrow=4, step=step)
        return kid(reference.cpu().float(), samples.cpu().float())

    # ---- optimizers ---------------------------------------------------------------------
    def configure_optimizers(self):
        latent_opt = RowAdam([self.latents.weight], lr=self.hparams.latent_lr, store=self.latents.store)
        if not self.train_network:
            return latent_opt
        net_opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.network_lr,
                                    weight_decay=self.hparams.weight_decay)
        return [latent_opt, net_opt]

    def progress(self) -> float:
        """How far the run is, in [0, 1]: steps over max_steps, or the budget clock if further."""
        trainer = self._trainer
        max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        by_steps = self.global_step / max_steps if max_steps and max_steps > 0 else 0.0
        by_clock = self.progress_clock() if self.progress_clock is not None else 0.0
        return min(1.0, max(by_steps, by_clock))

    def learning_rates(self) -> tuple[float, float]:
        """(latents, network) learning rates of the coming step: the network warms up linearly
        over warmup_steps; both follow lr_decay from 1 to lr_final over the run."""
        hp = self.hparams
        decay = decay_factor(self.progress(), hp.lr_decay, hp.lr_final)
        warmup = min(1.0, (self.global_step + 1) / max(1, hp.warmup_steps))
        return hp.latent_lr * decay, hp.network_lr * warmup * decay

    def set_learning_rates(self, optimizers: list) -> None:
        """Writes learning_rates() into the optimizers (latents first, then the network): a pure
        function of the step, so a resumed run continues the same curve."""
        for opt, lr in zip(optimizers, self.learning_rates()):
            for group in opt.param_groups:
                group["lr"] = lr

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a plain state_dict of the network."""
        return {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}

    def latents_payload(self) -> dict[str, Any]:
        """What latents.pt holds: x_T of the initialized rows (on the sphere), their indices, chain.
        With the table on disk, no x_T (it would be N x D in memory): 'latents_dir' points to the
        run's latents/ folder, read by latent_store.read_disk_latents."""
        idx = self.latents.ready.nonzero().flatten()
        if self.latents.store is not None:
            return {"indices": idx.cpu(), "chain": self.chain.to_dict(), "latents_dir": "latents",
                    "sphere": self.latents.sphere, "image_shape": list(self.latents.image_shape)}
        with torch.no_grad():
            x_T = self.latents(idx).detach().cpu()
        return {"x_T": x_T, "indices": idx.cpu(), "chain": self.chain.to_dict()}

    # ---- the on-disk table (latent_store.py) and Lightning checkpoints -------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The files are flushed, and their undo journal restarts, at every checkpoint. newton-scan's
        Jacobian tables (measured on the starting weights) go with it: a resume solves with them."""
        checkpoint["jacobian_tables"] = measured_tables(self.model)
        if self.latents.store is not None:
            self.latents.store.checkpoint(int(checkpoint["global_step"]))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """--resume: the files ran ahead of the checkpoint; put them back to its step. A run
        resumed with more images (--joint.num_images) grows the saved table; fewer are refused.
        newton-scan takes the run's saved Jacobian tables instead of measuring the restored weights."""
        keep_tables(self.model, checkpoint.get("jacobian_tables", []))
        if self.latents.store is not None:
            self.latents.store.rollback(int(checkpoint["global_step"]))
            return
        rows = self.latents.weight.shape[0]
        saved = grow_saved_rows(checkpoint, "latents.", rows)
        if saved > rows:
            raise UserInputError(
                f"the checkpoint holds the latents of {saved} images and this run has {rows}: a resume "
                f"may add images, not drop them; resume with --joint.num_images {saved} (a split that "
                f"lost images: put them back), or start a new run with --out NEW_FOLDER")


def reduce_latent_rows(table: torch.Tensor, index: torch.Tensor, mesh: "LocalMesh | TimeMesh") -> torch.Tensor:
    """The latents table's gradient on the rows of the global batch: summed over the world and
    divided by the data replicas, set back as a sparse gradient on those rows (what one process's
    embedding gives). A collective across processes. index (B,) the global batch; returns its
    distinct rows."""
    rows = torch.unique(index.to(table.device))
    grad = table.grad
    if grad is None:
        dense = torch.zeros(len(rows), table.shape[1], dtype=table.dtype, device=table.device)
    elif grad.is_sparse:
        dense = grad.coalesce().index_select(0, rows).to_dense()
    else:
        dense = grad[rows].clone()
    mesh.world_sum(dense).div_(mesh.data)
    # rows: distinct and in range (torch.unique of the table's own indices)
    table.grad = torch.sparse_coo_tensor(rows[None], dense, table.shape, check_invariants=False).coalesce()
    return rows
