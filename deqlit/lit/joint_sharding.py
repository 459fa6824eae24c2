"""Joint fine-tuning on a data x time process mesh (`train.py --task joint --trainer.strategy
ddp_time --parallel.time_shards K`).

Every process loads the whole global batch (the same EpochSampler order as one process, no
DistributedSampler), initializes the latents of all its rows, and keeps a full copy of the latents
table and of the network. A data replica takes its contiguous share of the batch (mesh.data_slice)
and of the prior batch, whose timesteps and noise are drawn for the global batch first, so nothing
depends on the world size. The replica's time shards solve its chain with ShardedDEQSampler (the
paper's onestep gradient); the shard that holds x_0 adds the whole loss (reconstruction,
typicality, prior preservation), the others backpropagate 0 * sum(X) (gradients.block_objective).
Each replica's loss is its share of the global batch's mean, times the number of replicas, so that:
  network: the ddp_time strategy's DDP hook sums over time and averages over data -> one process's;
  latents: kept out of DDP (a sparse, per-row table); the gradient rows of the global batch are
           all_reduced over the world and divided by the data replicas, then every process steps
           the same rows with RowAdam, so the tables stay equal.
Gradient clipping runs after these reductions, on the same gradient everywhere.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from deqlit.guards import NonFiniteError, UserInputError
from deqlit.parallel.gradients import block_objective
from deqlit.parallel.mesh import TimeMesh

# The LightningModule's tensors that DDP must not touch: the latents are reduced here, by row.
DDP_IGNORED = ["latents.weight", "latents.ready"]
ITS_OWN_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def check_shardable(joint: dict[str, Any], replicas: Optional[int] = None) -> None:
    """What joint fine-tuning under ddp_time cannot do, refused before anything runs, naming the fix.
    replicas: the data replicas when known (world / time shards)."""
    if joint.get("grad", "onestep") != "onestep":
        raise UserInputError(
            f"--joint.grad {joint.get('grad')} has no time-sharded backward yet: under --trainer.strategy "
            f"ddp_time use --joint.grad onestep (the paper's damped step), or run ift on one process "
            f"(drop --trainer.strategy ddp_time)")
    if joint.get("solver", "triangular-anderson") == "sequential":
        raise UserInputError(
            "--joint.solver sequential runs the T steps one after another and cannot be split over "
            "time shards: use --joint.solver triangular-anderson (or anderson, picard) under "
            "--trainer.strategy ddp_time, or drop --trainer.strategy ddp_time")
    if not joint.get("network_lr", 1e-5) > 0:
        raise UserInputError(
            "--joint.network_lr 0 (latents only) is not run under --trainer.strategy ddp_time: invert "
            "the images with invert.py (which shards over time), or set --joint.network_lr > 0")
    if replicas is not None and replicas > 1:
        num = joint.get("num_images")
        batch = min(joint.get("batch_size", 16), num or joint.get("batch_size", 16))
        smallest = min(batch, num % batch or batch) if num else batch
        prior = joint.get("prior_batch_size", 16)
        if min(smallest, prior) < replicas:
            raise UserInputError(
                f"{replicas} data replicas need at least {replicas} images in every batch (target batches "
                f"of down to {smallest}, prior batches of {prior}): raise --joint.batch_size / "
                f"--joint.prior_batch_size (and make --joint.num_images a multiple of the batch size), or "
                f"use more --parallel.time_shards per replica")


def distribution(cfg: dict) -> tuple[Optional[tuple[int, int]], dict[str, Any]]:
    """(the launcher's (processes per node, nodes) or None, the Trainer's strategy / devices /
    num_nodes) for a joint run. Empty options unless the trainer section asks for ddp_time; a
    torchrun / srun start joins the world here, before any process checks or writes the folder."""
    from deqlit.runs.inversion import time_shards_of, with_timeout
    from deqlit.runs.trainer import trainer_kwargs
    from deqlit.parallel.launch import external_launch, join_launched_world, launched_counts
    section = trainer_kwargs(cfg.get("trainer"))
    strategy = section.get("strategy")
    shards = (cfg.get("parallel") or {}).get("time_shards")
    if strategy != "ddp_time":
        if str(strategy).split("_")[0] in ITS_OWN_STRATEGIES:      # ddp_spawn, deepspeed_stage_2, ..
            raise UserInputError(f"joint fine-tuning runs on several processes with --trainer.strategy "
                                 f"ddp_time (--parallel.time_shards 1 splits only the images), not "
                                 f"{strategy!r} (ddp_time is what reduces the latents table by row and "
                                 f"counts the losses once per replica)")
        if shards not in (None, 1):
            raise UserInputError("--parallel.time_shards needs --trainer.strategy ddp_time")
        return None, {}
    launched = external_launch()
    if launched is not None:
        section = launched_counts(section, launched)
    shards = time_shards_of(cfg, section)
    try:
        world = int(section.get("devices", 1)) * int(section.get("num_nodes", 1))
    except (TypeError, ValueError):      # 'auto' or a list of devices: checked once the mesh exists
        world = None
    if world is not None and world % shards:
        raise UserInputError(f"--parallel.time_shards {shards} needs a multiple of {shards} processes, got "
                             f"{world}: use --trainer.devices {shards} (Lightning starts them) or torchrun "
                             f"--nproc_per_node {shards}")
    check_shardable(cfg.get("joint") or {}, None if world is None else max(1, world // shards))
    if launched is not None:
        join_launched_world(cfg, section)
    return launched, with_timeout({k: section[k] for k in ("strategy", "devices", "num_nodes") if k in section}, cfg)


class JointTimeSharding(Callback):
    """Puts a JointFineTuneModule on the ddp_time strategy's mesh (any time_shards, 1 included).

    setup runs after the strategy built the mesh and before DDP wraps the module: it keeps the
    latents out of DDP and routes training_step to `training_step` below."""

    def __init__(self) -> None:
        self.mesh: Optional[TimeMesh] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        mesh = getattr(trainer.strategy, "mesh", None)
        if mesh is None:
            return
        hp = pl_module.hparams
        check_shardable({"grad": hp.grad, "solver": hp.solver, "network_lr": hp.network_lr})
        self.mesh = mesh
        pl_module._ddp_params_and_buffers_to_ignore = list(DDP_IGNORED)
        pl_module.time_sharding = self
        if hp.compare_every and trainer.is_global_zero:
            print("note: grad/cosine_onestep_ift is not logged under --trainer.strategy ddp_time "
                  "(it needs the ift gradient, which is not sharded)")

    # ---- the step -------------------------------------------------------------------------
    def training_step(self, module, batch: dict[str, Any]) -> torch.Tensor:
        """JointFineTuneModule.training_step on this process's replica and time shard."""
        from deqlit.lit.joint_module import typicality_chi2
        from deqlit.parallel.sampler import ShardedDEQSampler
        hp, mesh = module.hparams, self.mesh
        index, images = batch["target"]
        prior_all = batch["prior"][0] if isinstance(batch["prior"], (tuple, list)) else batch["prior"]
        index = index.long()
        if len(index) < mesh.data or len(prior_all) < mesh.data:
            raise UserInputError(f"a batch of {len(index)} images (prior {len(prior_all)}) for {mesh.data} "
                                 f"data replicas: raise --joint.batch_size / --joint.prior_batch_size")
        module.initialize_rows(index, images)          # all rows of the global batch, everywhere
        mine, pmine = mesh.data_slice(len(index)), mesh.data_slice(len(prior_all))
        idx, x0, prior = index[mine], images[mine], prior_all[pmine]
        x_T = module.latents(idx)
        sampler = ShardedDEQSampler(module.model, module.chain, mesh.time_reducer(), hp.solver,
                                    hp.solver_options or {}, grad="onestep", tau=hp.tau, max_batch=hp.max_batch)
        X, stats = sampler(x_T)
        # Our share of the global batch's means, times the replicas (DDP then averages over them).
        share = mesh.data * len(idx) / len(index)
        prior_share = mesh.data * len(prior) / len(prior_all)
        pixels = prior[0].numel()
        train_prior = hp.prior_weight > 0

        def prior_mse() -> torch.Tensor:     # draws for the global prior batch, then our share
            return module.denoising_loss(prior_all, module.step_generator(), pmine)
        terms: dict[str, torch.Tensor] = {}

        def loss_of_x0(x0_hat: torch.Tensor) -> torch.Tensor:
            terms["recon"] = (x0_hat - x0).pow(2).flatten(1).sum(1)
            terms["chi2"] = typicality_chi2(x_T)
            loss = share * (terms["recon"].mean() + hp.typicality_weight * terms["chi2"].mean())
            if train_prior:
                terms["prior"] = prior_mse()
                loss = loss + hp.prior_weight * pixels * prior_share * terms["prior"]
            return loss
        objective = block_objective(X, sampler.block, loss_of_x0)
        if not bool(torch.isfinite(mesh_sum(objective.detach(), mesh))):
            raise NonFiniteError(f"joint fine-tuning diverged at step {module.global_step + 1}: the loss "
                                 f"is not finite")
        optimizers = module.zeroed_optimizers()
        module.set_learning_rates(optimizers)
        module.manual_backward(objective)       # the network's gradient: reduced by the DDP hook
        rows = reduce_latent_rows(module.latents.weight, index, mesh)
        net_opt = optimizers[1]
        if hp.grad_clip:
            module.clip_gradients(net_opt, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        net_opt.optimizer.step()                # raw: global_step counts the latents' steps only
        module.ema.update_parameters(module.model)
        optimizers[0].step()
        module.latents.renormalize(rows)
        # Logging: x_0 of the chain on every shard of the replica; the terms of this replica.
        with torch.no_grad():
            x0_hat = sampler.first_state(X)
            recon = (x0_hat - x0).pow(2).flatten(1).sum(1)
            chi2 = typicality_chi2(x_T.detach())
            prior_loss = terms["prior"].detach() if "prior" in terms else prior_mse()
        module.log_step(x0, x0_hat, x_T.detach(), recon, chi2, prior_loss, stats, idx, None)
        return objective.detach()


def mesh_sum(value: torch.Tensor, mesh: TimeMesh) -> torch.Tensor:
    """Sum of a scalar over the world (every process must agree whether to stop)."""
    out = value.detach().reshape(1).to(torch.float64).clone()
    dist.all_reduce(out)
    return out[0]


def reduce_latent_rows(table: torch.Tensor, index: torch.Tensor, mesh: TimeMesh) -> torch.Tensor:
    """The latents table's gradient on the rows of the global batch: summed over the world and
    divided by the data replicas, set back as a sparse gradient on those rows (what one process's
    embedding gives). A collective. index (B,) the global batch; returns its distinct rows."""
    rows = torch.unique(index.to(table.device))
    grad = table.grad
    if grad is None:
        dense = torch.zeros(len(rows), table.shape[1], dtype=table.dtype, device=table.device)
    elif grad.is_sparse:
        dense = grad.coalesce().index_select(0, rows).to_dense()
    else:
        dense = grad[rows].clone()
    dist.all_reduce(dense)
    dense.div_(mesh.data)
    # rows: distinct and in range (torch.unique of the table's own indices)
    table.grad = torch.sparse_coo_tensor(rows[None], dense, table.shape, check_invariants=False).coalesce()
    return rows
