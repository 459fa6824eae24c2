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


from deqlit.guards import UserInputError

ITS_OWN_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def check_shardable(joint: dict[str, Any], replicas: Optional[int] = None) -> None:
    """What joint fine-tuning under ddp_time cannot do, refused before anything runs, naming the fix.
    replicas: the data replicas when known (world / time shards)."""
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
