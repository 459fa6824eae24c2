"""Builds and runs joint fine-tuning (`train.py --task joint`) from a resolved config.

The run folder gets: ema.pt (the fine-tuned EMA weights, a plain state_dict that load_weights,
sample.py --ckpt and invert.py --ckpt read), latents.pt ({'x_T', 'indices', 'chain'}), metrics.json,
config.yaml, TensorBoard curves under tb/, and checkpoints/last.ckpt for --resume.

Any size of fine-tuning set: the images are streamed (joint_data.py); with joint.latents_on_disk
(auto: when the table and RowAdam's moments, 3 x N x D float32, exceed latents_disk_threshold_gb)
the latents live in RUN/latents/*.npy (latent_store.py), the checkpoints record only that, and
latents.pt points to that folder instead of holding x_T. The final evaluation (metrics.json) runs
in chunks of joint.eval_chunk images; per-image lists (psnr, autocorr, kurtosis) are written up to
joint.metrics_per_image_limit images, summaries always.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics.functional.image import peak_signal_noise_ratio

from deqlit.config import save_config
from deqlit.deq.solvers import options_from
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.sequential import ddim_sample
from deqlit.guards import RunInterrupted, UserInputError, atomic_torch_save
from deqlit.runs.folder_lock import folder_lock
from deqlit.runs.guards import (RUN_FILES, FolderStart, check_output_dir, interrupts_as_exceptions,
                                refuse_existing_run)
from deqlit.lit.joint_data import JointDataModule, fine_tuning_count
from deqlit.deq.degradations import frobenius_loss
from deqlit.diffusion.gaussianity import kurtosis, lag1_autocorrelation, typicality_chi2
from deqlit.lit.joint_module import JointFineTuneModule
from deqlit.lit.checkpoints import ExportEMA, SaveLast
from deqlit.runs.launch import Launch, launched_worker, on_rank_zero_of, prepare_launch, world_of
from deqlit.runs.resume import check_resume, record_resume, resume_checkpoint
from deqlit.runs.sections import module_arguments, resolve
from deqlit.runs.trainer import build_trainer, note_tolerance, saving



# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(models: dict[str, torch.nn.Module], latents: Callable[[torch.Tensor], torch.Tensor],
             indices: torch.Tensor, images: Callable[[torch.Tensor], torch.Tensor], chain: Chain,
             prior: torch.Tensor, abar: torch.Tensor, chunk: int = 64, per_image_limit: int = 1000,
             reference_limit: int = 256) -> dict[str, dict[str, Any]]:
    """Per model: exact (sequential DDIM) reconstructions of the images of `indices` (n,) from
    their latents, the latents' statistics, and the denoising MSE on `prior` (a bounded set of
    training images) and on the first `reference_limit` targets.

    latents(idx) -> x_T (b, C, H, W); images(idx) -> the targets (b, C, H, W). Runs `chunk` images
    at a time (memory bounded whatever n); per-image lists only when n <= per_image_limit."""
    from deqlit.evaluation import denoising_loss
    for model in models.values():
        model.eval()
    keep = len(indices) <= per_image_limit
    acc = {name: {"recon": 0.0, "psnr": [], "psnr_sum": 0.0, "psnr_min": math.inf} for name in models}
    stats = {"autocorr": [], "kurtosis": [], "autocorr_max": 0.0, "kurtosis_maxdev": 0.0, "chi2_sum": 0.0}
    for lo in range(0, len(indices), chunk):
        idx = indices[lo:lo + chunk]
        x_T = latents(idx).detach().cpu()
        targets = images(idx).to(x_T)
        rho, kurt = lag1_autocorrelation(x_T), kurtosis(x_T)
        stats["autocorr_max"] = max(stats["autocorr_max"], float(rho.abs().max()))
        stats["kurtosis_maxdev"] = max(stats["kurtosis_maxdev"], float((kurt - 3).abs().max()))
        stats["chi2_sum"] += float(typicality_chi2(x_T).sum())
        if keep:
            stats["autocorr"] += rho.tolist()
            stats["kurtosis"] += kurt.tolist()
        for name, model in models.items():
            x0 = ddim_sample(model, x_T, chain)
            a = acc[name]
            a["recon"] += float(frobenius_loss(x0, targets).sum())
            psnr = [float(peak_signal_noise_ratio(u.clamp(-1, 1), v, data_range=2.0)) for u, v in zip(x0, targets)]
            a["psnr_sum"] += sum(psnr)
            a["psnr_min"] = min(a["psnr_min"], min(psnr))
            if keep:
                a["psnr"] += psnr
    n = len(indices)
    reference = images(indices[:reference_limit]).to(prior)     # the targets' denoising MSE
    out = {}
    for name, model in models.items():
        a = acc[name]
        out[name] = {"recon_loss_mean": a["recon"] / n, "psnr_mean": a["psnr_sum"] / n, "psnr_min": a["psnr_min"],
                     **({"psnr": a["psnr"], "autocorr": stats["autocorr"]} if keep else {}),
                     "autocorr_max": stats["autocorr_max"],
                     **({"kurtosis": stats["kurtosis"]} if keep else {}),
                     "kurtosis_maxdev": stats["kurtosis_maxdev"],
                     "typicality_chi2_mean": stats["chi2_sum"] / n,
                     "denoise_mse_train": denoising_loss(model, prior, abar),
                     "denoise_mse_targets": denoising_loss(model, reference, abar)}
    return out


class ProcessTimeBudget(Callback):
    """Stops training once this process has used `seconds` of CPU time (time.process_time) since
    fit started: a budget that other programs on a shared machine do not eat into (benchmarks)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = float(seconds), None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.process_time()
        # lr_decay anneals over the budget, whatever the step count it will allow
        pl_module.progress_clock = lambda: (time.process_time() - self.start) / max(self.seconds, 1e-9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.process_time() - self.start >= self.seconds:
            trainer.should_stop = True


class SaveLatents(Callback):
    """Writes RUN/latents.pt next to ema.pt whenever a checkpoint is saved (rank 0)."""

    def __init__(self, path: Path):
        self.path = path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:       # on disk: a pointer to RUN/latents/, no x_T
            atomic_torch_save(pl_module.latents_payload(), self.path)


# ---- the run ---------------------------------------------------------------------------------
def joint_settings(cfg: dict) -> dict[str, Any]:
    """The resolved joint section, its counts and periods checked (the step count is the trainer
    section's): a negative period was a traceback (checkpoint_every) or ran every step (kid_every)."""
    joint = cfg["joint"]
    for key in ("batch_size", "timesteps"):
        value = joint[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"--joint.{key} must be a positive integer, got {value!r}")
    for key in ("checkpoint_every", "compare_every", "image_every", "kid_every"):
        value = joint[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserInputError(f"--joint.{key} must be a number of steps >= 0, got {value!r}")
    return joint


def check_replica_batches(joint: dict[str, Any], replicas: int) -> None:
    """Every data replica needs an image of every batch: refuse batches smaller than the replicas
    (the last target batch holds num_images mod batch_size), before anything runs."""
    if replicas <= 1:
        return
    num = joint["num_images"]
    batch = min(joint["batch_size"], num or joint["batch_size"])
    smallest = min(batch, num % batch or batch) if num else batch
    prior = joint["prior_batch_size"]
    if min(smallest, prior) < replicas:
        raise UserInputError(
            f"{replicas} data replicas need at least {replicas} images in every batch (target batches "
            f"of down to {smallest}, prior batches of {prior}): raise --joint.batch_size / "
            f"--joint.prior_batch_size (and make --joint.num_images a multiple of the batch size), or "
            f"use more --parallel.time_shards per replica")


def check_launch(launch: Launch, joint: dict[str, Any]) -> None:
    """Joint runs share the latents table by row and count the losses once per replica: only the
    ddp_time strategy does that (--parallel.time_shards 1 splits only the images)."""
    strategy = launch.section.get("strategy")
    if not launch.time_sharded and str(strategy).split("_")[0] in ("ddp", "fsdp", "deepspeed"):
        raise UserInputError(f"joint fine-tuning runs on several processes with --trainer.strategy "
                             f"ddp_time (--parallel.time_shards 1 splits only the images), not "
                             f"{strategy!r} (ddp_time is what reduces the latents table by row and "
                             f"counts the losses once per replica)")
    world = world_of(launch.section)
    if launch.time_sharded and world is not None:
        check_replica_batches(joint, max(1, world // launch.shards))


def build_joint(cfg: dict, ckpt: Optional[str] = None, resume: bool = False,
                before_writing: Optional[Callable[[], None]] = None
                ) -> tuple[JointFineTuneModule, JointDataModule]:
    """(module, datamodule) from the resolved config; the network from `ckpt`, joint.ckpt or
    checkpoint.path. The fine-tuning and prior splits are streamed; the latents table goes to
    RUN/latents/ when joint.latents_on_disk says so (opened, not created, when `resume`).

    before_writing() runs once the data and the network are read and checked, before the first
    write (the table on disk): run_joint checks and writes the run folder there, so that a refused
    checkpoint or an empty split leaves --out as it was."""
    from deqlit.data.streaming import Indexed, split_dataset
    from deqlit.lit.latent_store import DiskLatentStore, wants_disk
    from deqlit.models.build import build_noise_model
    joint, data = joint_settings(cfg), cfg["data"]
    name, root = data["name"], data["root"]
    split, prior_split = joint["split"], joint["prior_split"]
    images = split_dataset(name, split, data["resolution"], data["channels"], root)
    count = fine_tuning_count(len(images), joint["num_images"], split, name)
    prior = split_dataset(name, prior_split, data["resolution"], data["channels"], root)
    if len(prior) == 0:
        raise UserInputError(f"the prior split {prior_split!r} of {name!r} holds no images: choose "
                             f"another --joint.prior_split (the data the model was trained on)")
    image_shape = tuple(images[0].shape)
    model, abar, _ = build_noise_model(cfg, ckpt or joint["ckpt"])
    if before_writing is not None:
        before_writing()
    threshold = float(joint["latents_disk_threshold_gb"]) * 1024 ** 3
    store = None
    if wants_disk(joint["latents_on_disk"], count, math.prod(image_shape), threshold):
        store = DiskLatentStore(Path(joint["out"]) / "latents", count, math.prod(image_shape),
                                create=not resume)
    skip = ("model", "schedule_abar", "num_images", "image_shape", "solver_options", "latents_store")
    module = JointFineTuneModule(model, abar, count, image_shape,
                                 solver_options=options_from(joint["solver"], joint), latents_store=store,
                                 **module_arguments(joint, JointFineTuneModule, skip))
    datamodule = JointDataModule(Indexed(images, range(count)), prior, joint["batch_size"],
                                 joint["prior_batch_size"], joint["seed"], num_workers=joint["num_workers"],
                                 reference_images=joint["reference_images"])
    return module, datamodule


def time_shardable_adjoint(joint: dict[str, Any], shards: int) -> None:
    """ift's adjoint 'sweep' (faces.yaml's, for a CPU) solves the rows one after another and cannot
    be split over time shards; the default adjoint (plain iteration, tol 0, freezing) solves the same
    triangular system exactly in T calls that each evaluate all shards at once. Switch to it, and say
    so on the first process, where time shards run a sweep: under grad ift, and under onestep when
    compare_every logs the onestep-vs-ift cosine (which solves ift's adjoint too)."""
    adjoint = joint.get("adjoint") or {}
    uses = "ift's adjoint" if joint.get("grad") == "ift" else \
        "the adjoint of --joint.compare_every's onestep-vs-ift cosine" if joint.get("compare_every") else None
    if shards <= 1 or uses is None or adjoint.get("solver") != "sweep":
        return
    joint["adjoint"] = {"solver": "picard", "tol": 0.0, "freeze": True}   # cfg["joint"]: config.yaml records what ran
    if not launched_worker():
        print(f"--parallel.time_shards {shards}: {uses} runs as plain iteration to tol 0 with "
              f"freezing (the same exact adjoint in T calls over all shards; 'sweep' goes row by row "
              f"and cannot be split); --joint.adjoint '{{solver: picard, tol: 0.0, freeze: true}}' "
              f"says so explicitly", flush=True)


def run_joint(cfg: dict, resume: Optional[str] = None, fast_dev_run: bool = False,
              ckpt: Optional[str] = None) -> JointFineTuneModule:
    """Fine-tune as the config says: its Trainer is the trainer section's (runs.trainer), launched
    the way every job is (runs.launch); rank 0 alone checks and writes the run folder."""
    cfg = resolve(cfg, "joint")
    joint = joint_settings(cfg)
    out = Path(joint["out"])
    ckpt_dir = out / "checkpoints"
    launch = prepare_launch(cfg)
    check_launch(launch, joint)
    time_shardable_adjoint(joint, launch.shards)
    ckpt_path = resume_checkpoint(resume, ckpt_dir) if resume else None

    # Rank 0 (check_folder runs there only) holds the folder while the run lasts: a second joint
    # run, train.py or invert.py there is refused; a run that fails before its first checkpoint
    # removes what it wrote (config.yaml, tb/, the latent table), and so does a --fast-dev-run step.
    start = FolderStart(out, results="checkpoints/*.ckpt")
    held = contextlib.ExitStack()

    def check_folder() -> Optional[dict[str, Any]]:
        record = check_resume(cfg, out, ckpt_path, "joint") if ckpt_path else None
        if not resume:
            refuse_existing_run(out, RUN_FILES)
        check_output_dir(out)
        if fast_dev_run:        # after the lock has let go: nothing of a debug step is kept
            held.callback(start.discard)
        held.enter_context(start.undone_on_failure())
        held.enter_context(folder_lock(out, "train.py --task joint"))
        start.creates(out / "config.yaml", out / "tb", ckpt_dir, out / "latents")
        if record is None:
            save_config(cfg, out / "config.yaml")
        else:
            record_resume(out, record)
    with held:
        L.seed_everything(joint["seed"], workers=True)
        module, datamodule = build_joint(cfg, ckpt, resume=bool(resume),
                                         before_writing=lambda: on_rank_zero_of(launch, check_folder))
        if launch.time_sharded and module.latents.store is not None:
            raise UserInputError("--joint.latents_on_disk (the table in RUN/latents/) is not shared between "
                                 "the processes of --trainer.strategy ddp_time yet: pass "
                                 "--joint.latents_on_disk false (each process keeps the table in memory)")
        from deqlit.evaluation import denoising_loss
        before = {"denoise_mse_train": denoising_loss(module.model, datamodule.prior_images(), module.abar)}

        export = ExportEMA(out / "ema.pt")
        saver = SaveLast(ckpt_dir / "last.ckpt", export)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1, filename="step-{step}",
                                     auto_insert_metric_name=False, enable_version_counter=False,
                                     every_n_train_steps=joint["checkpoint_every"])
        max_time, cpu_budget = joint["max_time_s"], joint["max_process_s"]   # benchmarks' budgets
        extra = [] if cpu_budget is None else [ProcessTimeBudget(cpu_budget)]
        trainer = build_trainer(launch, max_time=None if max_time is None else timedelta(seconds=float(max_time)),
                                logger=TensorBoardLogger(str(out), name="tb", version=0, default_hp_metric=False),
                                **saving(fast_dev_run, [checkpoint, export, SaveLatents(out / "latents.pt"), saver],
                                         extra),
                                use_distributed_sampler=False,    # ddp_time: every process loads the global batch
                                fast_dev_run=fast_dev_run, num_sanity_val_steps=0)
        if joint["solver"] != "sequential":
            note_tolerance(trainer, joint.get("tol"), "--joint.tol")
        start, cpu_start = time.time(), time.process_time()
        try:
            with interrupts_as_exceptions(trainer), warnings.catch_warnings():
                # Both expected here: the network stays in eval mode on purpose (dropout would make the
                # fixed-point map random), and a checkpoint holds the state after the step's update,
                # which is what --resume continues from (tested equal to an uninterrupted run).
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
                warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization")
                try:
                    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
                except SIGTERMException:
                    raise RunInterrupted(signal.SIGTERM) from None
        except RunInterrupted as err:
            raise RunInterrupted(err.signum, *saver.interrupted(trainer.global_step, ckpt_path,
                                                                trainer.max_steps)) from None
        if fast_dev_run and trainer.is_global_zero:
            print(f"fast-dev-run: {trainer.global_step} fine-tuning step(s) ran; nothing was kept in {out}")
        if fast_dev_run or not trainer.is_global_zero:
            return module
        metrics = write_metrics(module, datamodule, out, time.time() - start, before,
                                process_seconds=time.process_time() - cpu_start, chunk=joint["eval_chunk"],
                                per_image_limit=joint["metrics_per_image_limit"])
        print(summary_line(metrics, out))
        print(f"view the curves: tensorboard --logdir {out / 'tb'}")
        return module


def summary_line(metrics: dict[str, Any], out: Path) -> str:
    """What a finished run prints: where its files are and how the EMA weights score."""
    ema, start = metrics["ema"], metrics.get("start_denoise_mse_train")
    ratio = (f"; denoising MSE on the prior images {ema['denoise_mse_train'] / start:.2f}x the start's"
             if start else "")
    return (f"wrote {out / 'ema.pt'}, {out / 'latents.pt'} and {out / 'metrics.json'}: {metrics['steps']} "
            f"steps in {metrics['seconds']:.0f} s; the EMA weights regenerate the {metrics['num_images']} "
            f"images at PSNR {ema['psnr_mean']:.1f} dB mean (min {ema['psnr_min']:.1f}) from latents with "
            f"lag-1 autocorrelation <= {ema['autocorr_max']:.3f}{ratio}")


def write_metrics(module: JointFineTuneModule, datamodule: JointDataModule, out: Path, seconds: float,
                  before: dict[str, float], process_seconds: Optional[float] = None, chunk: int = 64,
                  per_image_limit: int = 1000) -> dict[str, Any]:
    """RUN/metrics.json: the EMA and the raw network scored on every initialized latent (evaluate,
    in chunks); 'per_image' says whether the per-image lists are there (n <= per_image_limit)."""
    if module.latents.store is not None:
        module.latents.store.flush()
    idx = module.latents.ready.nonzero().flatten().cpu()
    dtype = next(module.model.parameters()).dtype     # --trainer.precision 64-true: float64 weights
    with torch.no_grad():
        scores = evaluate({"ema": module.ema.module.cpu(), "raw": module.model.cpu()}, module.latents, idx,
                          datamodule.target_images, module.chain, datamodule.prior_images().to(dtype),
                          module.abar.cpu(),
                          chunk=chunk, per_image_limit=per_image_limit,
                          reference_limit=datamodule.reference_images)
    metrics = {"steps": module.global_step, "seconds": round(seconds, 1),
               "process_seconds": None if process_seconds is None else round(process_seconds, 1),
               "num_images": len(idx), "per_image": len(idx) <= per_image_limit,
               "chain": module.chain.to_dict(), "grad": module.hparams.grad,
               "ema": scores["ema"], "raw": scores["raw"],
               "start_denoise_mse_train": before.get("denoise_mse_train")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
