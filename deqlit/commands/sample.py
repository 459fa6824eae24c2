"""sample.py: generate images from x_T with DEQ-DDIM (or the sequential chain) and report figures.

Each run writes into a folder of its own: --out, or by default sampling.out (runs/sample-<data>)
and, for --interpolate, sampling.interpolate_out (runs/interpolate-<data>, -lerp appended with
--interp lerp). Every run folder holds the resolved config.yaml (`--config RUN/config.yaml`
replays the run). A folder that holds an earlier run's outputs is refused, and a run that fails
before writing removes the folders it created.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm import tqdm

from deqlit.cli import ArgumentParser, int_at_least, parse, positive_int, typed_keys
from deqlit.config import save_config
from deqlit.deq.solvers import option_defaults, options_from
from deqlit.devices import placement, precision_note, section_precision, tolerance_note
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.interpolation import FRAMES_RULE
from deqlit.evaluation import DatasetMetrics, format_metrics
from deqlit.guards import (NonFiniteError, OutputFolderError, RankZeroStopped, RunInterrupted, UserInputError,
                           first_few, first_nonfinite)
from deqlit.models.build import build_noise_model
from deqlit.parallel.launch import from_rank_zero, gather_over_data, objects_over_data
from deqlit.pictures import numbered_grid, save_picture
from deqlit.runs import sample_batches
from deqlit.runs.folder_lock import folder_lock
from deqlit.runs.guards import FolderStart, check_output_dir, interrupts_as_exceptions
from deqlit.runs.latents import read_latents
from deqlit.runs.sections import refuse_other_solvers_options
from deqlit.runs.launch import prepare_launch, process_mesh, world_of
from deqlit.sampling import SAMPLERS, combine_stats, draw_noise, generate

FLAGS = {"timesteps": "sampling.timesteps", "skip": "sampling.skip", "eta": "sampling.eta",
         "solver": "sampling.solver", "max_iter": "sampling.max_iter", "tol": "sampling.tol",
         "num_images": "sampling.num_images", "seed": "sampling.seed", "out": "sampling.out",
         "ckpt": "checkpoint.path", "max_batch": "sampling.max_batch", "batch_size": "sampling.batch_size"}
# The flags of --interpolate and their defaults (None in the parser: a flag typed without
# --interpolate is refused, a default is not).
INTERPOLATION = {"pairs": "0:1", "frames": 9, "interp": "slerp"}
# What a sampling or interpolation run writes: a folder holding any of them is refused.
OUTPUTS = ("config.yaml", "metrics.json", "samples.png", "samples.pt", "samples_sequential.png", "strip_*.png",
           sample_batches.RUN_FILE, sample_batches.BATCH_DIR)
GRID_LIMIT = 256     # samples.png shows at most this many samples (samples.pt holds them all)


frame_count = int_at_least(2, FRAMES_RULE)      # argparse type of --frames


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Sample with DEQ-DDIM. Any config key can be "
                                "overridden as --section.key value; device and precision as "
                                "--trainer.accelerator cpu|gpu|auto, --trainer.precision 64-true.")
    p.add_argument("--ckpt", help="weights (default: checkpoint.path of the config)")
    p.add_argument("--timesteps", type=positive_int, help="T, the number of DDIM steps")
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--eta", type=float, help="0 = DDIM / DEQ-DDIM; > 0 = DEQ-sDDIM")
    p.add_argument("--solver", choices=SAMPLERS)
    p.add_argument("--max-iter", type=positive_int, dest="max_iter")
    p.add_argument("--tol", type=float)
    p.add_argument("--num-images", type=positive_int, dest="num_images")
    p.add_argument("--max-batch", type=positive_int, dest="max_batch", help="rows per network call")
    p.add_argument("--batch-size", type=positive_int, dest="batch_size", help="images per solve "
                   "(default sampling.batch_size): more images are solved in consecutive batches, "
                   "with the same samples; a solve holds T states of each of its images")
    p.add_argument("--seed", type=int)
    p.add_argument("--latents", help="latents of invert.py or train.py --task joint (RUN/latents.pt "
                   "or the run folder, part files included): regenerate the first --num-images "
                   "images with the chain (and noise) saved with them")
    p.add_argument("--interpolate", metavar="LATENTS", help="morph between pairs of saved latents "
                   "(a file or run folder as for --latents; a joint run's own ema.pt weights are used "
                   "unless --ckpt is given): strip_I_J.png per pair and metrics.json, in --out "
                   "(default: sampling.interpolate_out of the config, e.g. runs/interpolate-faces; "
                   "with --interp lerp, runs/interpolate-faces-lerp)")
    p.add_argument("--pairs", help="with --interpolate: rows to join, e.g. 0:1,2:3 (default "
                   f"{INTERPOLATION['pairs']})")
    p.add_argument("--frames", type=frame_count, help="with --interpolate: images per strip, the two "
                   f"endpoints included (default {INTERPOLATION['frames']})")
    p.add_argument("--interp", choices=["slerp", "lerp"], help="with --interpolate: great circle "
                   "(slerp, white noise's sphere; the default) or straight line")
    p.add_argument("--compare-sequential", action="store_true", dest="compare",
                   help="also run the sequential chain on the same x_T and noise and compare")
    p.add_argument("--out", help="output folder, new or without an earlier run's outputs (default: "
                   "sampling.out of the config, e.g. runs/sample-faces)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out: its "
                   "finished batches (--batch-size) are kept, the rest solved (the same processes: "
                   "a ddp_time run resumes with as many data replicas)")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")
    p.add_argument("--metrics", help="comma-separated distances to --ref-data written into "
                   "metrics.json: fid, kid (need --fid-weights), fd-random, kd-random (offline)")
    p.add_argument("--ref-data", dest="ref_data", help="dataset for --metrics (default: --data)")
    p.add_argument("--fid-weights", dest="fid_weights", help="local Inception weights file for "
                   "fid/kid (default: evaluation.fid_weights of the config)")
    return p


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (data range 2), as a float."""
    return float(peak_signal_noise_ratio(a.clamp(-1, 1).double(), b.clamp(-1, 1).double(), data_range=2.0))


def chosen_chain(args: argparse.Namespace, s: dict, schedule: torch.Tensor,
                 saved: Optional[dict]) -> Chain:
    """The config's chain, or the one saved with the latents (never rebuilt from a step count)."""
    if saved is None:
        return Chain.build(schedule, s["timesteps"], s["skip"], s["eta"])
    chain = Chain.from_dict(saved["chain"])
    chain.check_schedule(schedule)
    if args.timesteps is not None or args.skip is not None or args.eta is not None:
        raise ValueError("--latents regenerates with the chain saved in the file; drop --timesteps, "
                         "--skip and --eta (other values would not reproduce the images)")
    return chain


def solve_summary(stats, T: int, tol: float) -> str:
    """How the solve ended, in words. At call T of the triangular chain every row is exact by
    construction; the last residual then measures the final update, so it is not compared with tol."""
    if stats.exact_by_depth:
        return (f"exact after T = {T} iterations (triangular chain; last update's residual "
                f"{stats.final_residual:.2e})")
    if stats.converged:
        return f"converged after {stats.iterations} iterations, residual {stats.final_residual:.2e} < tol {tol:g}"
    return (f"NOT converged: residual {stats.final_residual:.2e} >= tol {tol:g} after "
            f"{stats.iterations} iterations")


def shown_samples(count: int) -> str:
    """What samples.png shows of `count` samples: all of them, or the first GRID_LIMIT."""
    if count <= GRID_LIMIT:
        return f"{count} samples"
    return f"samples #0-#{GRID_LIMIT - 1} of {count} (all in samples.pt)"


def samples_title(solver: str, chain: Chain, stats, tol: float, count: int) -> str:
    """samples.png's title: which samples, the solver, T (and eta), and how the solve ended."""
    eta = f", eta = {chain.eta:g}" if chain.eta else ""
    return f"{shown_samples(count)}: {solver}, T = {chain.T}{eta}\n{solve_summary(stats, chain.T, tol)}"


def save_grid(x0: torch.Tensor, path: Path, title: str) -> None:
    """x0 (N, C, H, W) in [-1, 1] as a labelled grid: each image upscaled, #index under it."""
    save_picture(numbered_grid(x0[:GRID_LIMIT], title), path)


def refuse_interpolation_flags(args: argparse.Namespace) -> None:
    """--pairs, --frames and --interp typed without --interpolate would be ignored: refuse them."""
    typed = [f"--{name}" for name in INTERPOLATION if getattr(args, name) is not None]
    if typed and not args.interpolate:
        raise UserInputError(f"{', '.join(typed)} set{'s' if len(typed) == 1 else ''} the morphs of "
                             f"--interpolate LATENTS: add --interpolate RUN/latents.pt, or drop "
                             f"{' and '.join(typed)} to sample")


# Flags of plain sampling that --interpolate would not read (the morphs decode the saved latents
# with their own chain, and the midpoints' fd-random is always reported).
NOT_INTERPOLATION = {"num_images": "--num-images", "metrics": "--metrics", "ref_data": "--ref-data",
                     "resume": "--resume", "batch_size": "--batch-size",
                     "fid_weights": "--fid-weights", "compare": "--compare-sequential",
                     "timesteps": "--timesteps", "skip": "--skip", "eta": "--eta"}


def refuse_sampling_flags(args: argparse.Namespace) -> None:
    """Flags typed with --interpolate that it would ignore: refuse them by name."""
    typed = [flag for name, flag in NOT_INTERPOLATION.items() if getattr(args, name, None) not in (None, False)]
    if typed:
        raise UserInputError(f"{', '.join(typed)} would do nothing with --interpolate (it decodes the saved "
                             f"latents with their own chain, all pairs given by --pairs, and reports the "
                             f"midpoints' fd-random itself): drop {' and '.join(typed)}")


def refuse_earlier_outputs(out: Path) -> None:
    """OutputFolderError if `out` holds what a sampling or interpolation run writes (OUTPUTS)."""
    found = sorted({p.name for pattern in OUTPUTS for p in out.glob(pattern)}) if out.is_dir() else []
    if found:
        listed = first_few(found, 4)
        # Only a sample.py run resumes here (invert.py writes a run.json too).
        unfinished = sample_batches.holds_sample_run(out) and "samples.pt" not in found
        raise OutputFolderError(f"--out {out} holds an earlier run's outputs ({listed}), which this run "
                                f"would overwrite: pass --out NEW_FOLDER"
                                + (", or --resume to finish that run" if unfinished else ""))


@contextlib.contextmanager
def output_folder(path: str | Path, lock: bool = True, resume: bool = False,
                  start: Optional[FolderStart] = None) -> Iterator[Path]:
    """The output folder: refused if it holds an earlier run's outputs, else created and proven
    writable, and locked while the block runs (`lock`: the process that writes; a second sample.py
    on the same folder meanwhile is refused naming the first, as invert.py and train.py are). If
    the block fails, what `start` noted is undone (FolderStart: unless a result is on disk or it
    was an interrupt), then the folders created here are removed while they are empty, so that a
    failed run leaves no empty --out behind. `resume`: the earlier outputs are the caller's to check."""
    out = Path(path)
    if not resume:                   # --resume: the caller checks the run it continues
        refuse_earlier_outputs(out)
    created = [p for p in (out, *out.parents) if not p.exists()]      # deepest first
    check_output_dir(out)
    try:
        # The lock is let go (its file removed) before the empty folders are.
        with folder_lock(out, "sample.py") if lock else contextlib.nullcontext():
            with start.undone_on_failure() if start is not None else contextlib.nullcontext():
                yield out
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()           # an empty folder only
            except OSError:
                break
        raise


@contextlib.contextmanager
def run_folder(path: str | Path, identity: dict[str, Any], resume: bool, mesh, cfg: dict
               ) -> Iterator[tuple[Path, dict[int, tuple[torch.Tensor, Any]], int]]:
    """(the run's output folder, this process's batches finished earlier (index -> (x_0, stats);
    runs/sample_batches.py), how many batches every replica finished earlier).

    One process, or rank 0 of several, holds the folder (output_folder: refused if it holds an
    earlier run, locked) and writes run.json and config.yaml (the resolved `cfg`: --config
    RUN/config.yaml replays the run), or with `resume` checks run.json against `identity`
    and lists every replica's finished batches. Rank 0's verdict, its error or those lists, reaches
    every other process before any of them solves: they never read the folder while rank 0 writes
    into it, and a refused folder stops them all at once instead of leaving them waiting in the
    solver's first collective until the timeout."""
    out = Path(path)
    replicas, replica = (1, 0) if mesh is None else (mesh.data, mesh.data_index)
    with contextlib.ExitStack() as stack:
        finished, error = None, None
        if mesh is None or mesh.rank == 0:
            try:
                start = FolderStart(out, results=sample_batches.BATCH_FILES)
                stack.enter_context(output_folder(out, resume=resume, start=None if resume else start))
                if resume:
                    sample_batches.check_resume(out, identity)
                    finished = [sample_batches.finished_batches(out, r, replicas) for r in range(replicas)]
                else:
                    start.creates(out / sample_batches.RUN_FILE, out / sample_batches.BATCH_DIR,
                                  out / "config.yaml")
                    sample_batches.write_identity(out, identity)
                    save_config(cfg, out / "config.yaml")
                    finished = [[] for _ in range(replicas)]
            except Exception as err:      # raised below, once the other processes have heard of it
                error = err
        if mesh is not None:
            finished, said = from_rank_zero((finished, None if error is None else f"{type(error).__name__}: {error}"))
            if error is None and said is not None:
                raise RankZeroStopped(said)
        if error is not None:
            raise error
        yield (out, sample_batches.load_batches(out, finished[replica], replica, replicas),
               sum(len(indices) for indices in finished))


# Strategies that sample.py runs as one process or as a data x time mesh; others are refused.
ONE_PROCESS = (None, "auto")
DATA_PARALLEL = "ddp"


def sampling_layout(cfg: dict, interpolate: bool) -> None:
    """Map the trainer section onto sample.py's processes, in place, before any starts.

    Data-parallel sampling is the ddp_time mesh with one time shard, so --trainer.strategy ddp
    (or auto with --trainer.devices N > 1) becomes ddp_time with parallel.time_shards 1 instead of
    silently running one process; a strategy sample.py cannot run is refused by name. --interpolate
    runs in one process: more are refused here, before they would be started."""
    section, parallel = cfg["trainer"], cfg["parallel"]
    strategy, world = section.get("strategy"), world_of(section)
    if interpolate:
        typed = ([f"--trainer.strategy {strategy}"] if strategy in (DATA_PARALLEL, "ddp_time") else []) + \
                ([f"--trainer.devices {section.get('devices')}"] if (world or 1) > 1 else [])
        if typed:
            raise UserInputError(f"--interpolate runs in one process: drop {' and '.join(typed)}")
        return
    if strategy not in (*ONE_PROCESS, DATA_PARALLEL, "ddp_time"):
        raise UserInputError(f"sample.py cannot run --trainer.strategy {strategy}: use ddp (data-parallel "
                             f"over --trainer.devices N) or ddp_time (each chain split over "
                             f"--parallel.time_shards processes)")
    if strategy == DATA_PARALLEL or (strategy in ONE_PROCESS and (world or 1) > 1):
        if parallel.get("time_shards") not in (None, 1):
            return                       # prepare_launch refuses time shards without ddp_time
        section["strategy"], parallel["time_shards"] = "ddp_time", 1


def precision_of(cfg: dict) -> str:
    """The trainer precision as placement() reads it: the parameter dtype and the autocast."""
    return str(cfg["trainer"].get("precision", "32-true"))


def stored(x: torch.Tensor) -> torch.Tensor:
    """Samples as saved, on the CPU: float32 and float64 kept (64-true's float64 is not cut to
    float32), half precisions widened to float32."""
    x = x.detach().cpu()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, cfg = parse(build_parser(), argv, FLAGS, task="sample")
    refuse_interpolation_flags(args)
    s = cfg["sampling"]
    refuse_other_solvers_options(typed_keys(argv), "sampling", s["solver"], "--solver")
    device, dtype, autocast = placement(cfg["trainer"])
    sampling_layout(cfg, bool(args.interpolate))
    # --trainer.strategy ddp_time: a data x time mesh (None: one process), joined as every job
    # joins it (torchrun / srun, or --trainer.devices N started here).
    mesh = process_mesh(prepare_launch(cfg), device)
    notes = [precision_note(device.type, cfg["trainer"].get("precision", "32-true"))]
    if s["solver"] != "sequential" and not args.interpolate:
        notes.append(tolerance_note(section_precision(cfg["trainer"]), s["tol"], "--tol"))
    for note in notes:
        if note and (mesh is None or mesh.rank == 0):
            print(note, flush=True)
    if args.interpolate:
        return interpolate_main(args, cfg, device, dtype)
    saved = read_latents(args.latents, args.num_images) if args.latents else None
    if saved is not None and args.num_images is not None and len(saved["x_T"]) < args.num_images:
        raise UserInputError(f"--num-images {args.num_images} asks for more images than --latents "
                             f"{args.latents} holds ({len(saved['x_T'])}): pass --num-images "
                             f"{len(saved['x_T'])} or fewer, or drop it to regenerate them all")
    model, schedule, ckpt_path = build_noise_model(cfg)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise NonFiniteError(f"the checkpoint {ckpt_path} holds NaN/Inf weights ({bad}): it comes from "
                             f"a diverged run; use an earlier checkpoint")
    chain = chosen_chain(args, s, schedule, saved)
    options = options_from(s["solver"], s)
    # Checked before any compute: missing metric weights or reference data, an unusable --out.
    count = s["num_images"] if saved is None else len(saved["x_T"])
    if args.metrics and count < 2:
        raise ValueError(f"--metrics compares distributions and needs at least 2 images; got {count} "
                         f"(raise --num-images)")
    if s["batch_size"] is not None and s["batch_size"] < 1:
        raise ValueError(f"sampling.batch_size must be >= 1 (images per solve) or null, got {s['batch_size']}")
    if saved is not None and chain.eta > 0 and saved.get("noise") is None:
        raise ValueError(f"{args.latents} was found with eta = {chain.eta} but holds no noise")
    quality = (DatasetMetrics.from_config(args.metrics, cfg, model, args.ref_data, args.fid_weights)
               if args.metrics else None)
    # What the run samples: --resume continues only a run of the same (runs/sample_batches.py).
    identity = {"seed": s["seed"], "num_images": count, "batch_size": s["batch_size"],
                "chain": chain.to_dict(), "solver": s["solver"],
                # with the defaults, as metrics.json: typing a default value changes nothing
                "solver_options": {**option_defaults(s["solver"]), **options,
                                   "max_iter": s["max_iter"], "tol": s["tol"]},
                "checkpoint": str(ckpt_path), "latents": args.latents, "dtype": str(dtype),
                # the parameter dtype alone is float32 under bf16-mixed and 16-mixed too
                "precision": precision_of(cfg)}
    if mesh is not None and mesh.data > 1:    # each replica numbers its own batches
        identity["data_replicas"] = mesh.data
    with run_folder(s["out"], identity, args.resume, mesh, cfg) as (out, done, resumed):
        on_batch = None
        if mesh is None or mesh.time_index == 0:     # one writer per replica (its shards hold the same x_0)
            replica, replicas = (0, 1) if mesh is None else (mesh.data_index, mesh.data)
            on_batch = lambda index, x0, stats: sample_batches.save_batch(  # noqa: E731
                out, index, x0, stats, replica, replicas)
        model = model.to(device=device, dtype=dtype)
        if saved is None:
            shape = (s["num_images"], model.in_channels, model.resolution, model.resolution)
            x_T, noise = draw_noise(shape, chain.T, chain.eta, torch.Generator().manual_seed(s["seed"]))
        else:
            x_T, noise = saved["x_T"], saved.get("noise")
        x_T = x_T.to(device=device, dtype=dtype)
        noise = None if noise is None else noise.to(device=device, dtype=dtype)
        all_x_T, all_noise = x_T, noise
        if mesh is not None:   # this replica's images, drawn from the one seed: results independent of the world
            mine = mesh.data_slice(x_T.shape[0])
            x_T, noise = x_T[mine], None if noise is None else noise[:, mine]

        batch_size = s["batch_size"]
        solves = 1 if batch_size is None else -(-x_T.shape[0] // batch_size)
        bar = tqdm(total=solves * (min(s["max_iter"], chain.T) if s["solver"] != "sequential" else chain.T),
                   desc=f"{s['solver']} T={chain.T}" + (f", {solves} batches" if solves > 1 else ""), unit="it",
                   disable=args.no_progress or (mesh is not None and mesh.rank != 0))

        def on_iteration(n, stats, fx):
            bar.update(1)
            if stats.exact_by_depth:     # call T of the triangular chain: the residual is no error
                bar.set_postfix_str(f"exact after T = {chain.T} iterations")
            elif stats.rel_trace:
                bar.set_postfix(residual=f"{stats.last_rel():.2e}")

        start = time.perf_counter()
        try:
            # Ctrl-C / SIGTERM stop with the finished batches saved and a --resume line (several
            # processes: each gets the signal from the terminal, torchrun or the scheduler).
            with interrupts_as_exceptions(), torch.no_grad(), autocast:
                x0, stats = generate(model, x_T, chain, s["solver"], noise=noise, max_batch=s["max_batch"],
                                     reducer=None if mesh is None else mesh.time_reducer(),
                                     batch_size=batch_size, done=done, on_batch=on_batch,
                                     callback=on_iteration, **options)
        except RunInterrupted as err:
            bar.close()
            if mesh is not None and mesh.rank != 0:      # rank 0 says what was kept and how to resume
                raise RunInterrupted(err.signum, resumable=False) from None
            kept = len(list(out.glob(sample_batches.BATCH_FILES)))
            raise RunInterrupted(err.signum, f"{kept} finished batch(es) of up to {batch_size} image(s) "
                                 f"kept in {out}") from None
        seconds = time.perf_counter() - start
        bar.total = bar.n          # the batches stopped before their caps: end the bar full
        bar.close()
        if mesh is not None:   # rank 0 writes everything, the stats as one solve of all replicas'
            x0, x_T, noise = gather_over_data(mesh, x0), all_x_T, all_noise
            stats = combine_stats(objects_over_data(mesh, replace(stats, abs_trace=[], rel_trace=[])))
            if mesh.rank != 0:
                return {}
        x0 = stored(x0)
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteError("the samples hold NaN/Inf: the model's outputs are not finite for these "
                                 "inputs (check the checkpoint; try --trainer.precision 32-true)")

        count = int(x0.shape[0])
        save_grid(x0, out / "samples.png", samples_title(s["solver"], chain, stats, s["tol"], count))
        metrics = {
            "solver": s["solver"], "solver_options": {k: v for k, v in {**option_defaults(s["solver"]), **options}.items()
                               if k not in ("max_iter", "tol")},
            "batch_size": batch_size, "timesteps": chain.T, "timesteps_requested": chain.requested,
            "skip": chain.skip, "eta": chain.eta, "num_images": count, "seed": s["seed"],
            "checkpoint": str(ckpt_path), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "precision": precision_of(cfg),
            "iterations": stats.iterations, "nfe": stats.iterations,
            "network_evals_per_image": stats.network_rows, "converged": stats.converged,
            "final_residual": stats.rel_residual[-1] if stats.rel_residual else 0.0,
            "exact_by_depth": stats.exact_by_depth,
            "residual_trace": stats.rel_residual, "abs_residual_trace": stats.abs_residual,
            "image_iterations": stats.image_iterations, "image_residual": stats.image_residual,
            "seconds": seconds, "chain": chain.to_dict(),
        }
        if saved is not None and saved.get("reconstructions") is not None:
            metrics["x0_psnr_vs_saved"] = psnr(x0, saved["reconstructions"].float())
        if args.compare:
            start = time.perf_counter()
            with torch.no_grad(), autocast:
                x0_seq, _ = generate(model, x_T, chain, "sequential", noise=noise)
            x0_seq = stored(x0_seq)       # compared in the samples' own dtype
            metrics["sequential_seconds"] = time.perf_counter() - start
            metrics["x0_rmse_vs_sequential"] = float((x0 - x0_seq).pow(2).mean().sqrt())
            metrics["x0_psnr_vs_sequential"] = psnr(x0, x0_seq)
            eta = f", eta = {chain.eta:g}" if chain.eta else ""
            save_grid(x0_seq, out / "samples_sequential.png",
                      f"{shown_samples(count)}: sequential, T = {chain.T}{eta} (the same x_T)\n"
                      f"x_0 RMSE to the {s['solver']} samples {metrics['x0_rmse_vs_sequential']:.2e} "
                      f"(PSNR {metrics['x0_psnr_vs_sequential']:.1f} dB)")
        if quality is not None:
            metrics.update(quality(x0))
            print(format_metrics(metrics))
        torch.save({"x_T": x_T.cpu(), "noise": None if noise is None else noise.cpu(), "x0": x0,
                    "chain": chain.to_dict()}, out / "samples.pt")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        sample_batches.finish(out)   # samples.pt holds every image now
    if resumed:
        print(f"resumed: {resumed} finished batch(es) of up to {batch_size} image(s) read from {out}")
    print(f"wrote {out / 'samples.png'}, {out / 'samples.pt'} (x_T, noise, x_0, chain) and "
          f"{out / 'metrics.json'}: {solve_summary(stats, chain.T, s['tol'])}, {seconds:.1f} s on {device}")
    if "x0_psnr_vs_saved" in metrics:
        print(f"regenerated images against the reconstructions saved with the latents: PSNR "
              f"{metrics['x0_psnr_vs_saved']:.1f} dB")
    if args.compare:
        print(f"sequential: {metrics['sequential_seconds']:.1f} s, x0 RMSE vs sequential "
              f"{metrics['x0_rmse_vs_sequential']:.2e} (PSNR {metrics['x0_psnr_vs_sequential']:.1f} dB)")
    return metrics


def interpolate_main(args: argparse.Namespace, cfg: dict, device, dtype) -> dict:
    """sample.py --interpolate: strips between pairs of saved latents (commands/interpolate.py)."""
    from deqlit.commands.interpolate import check_interpolation, fine_tuned_weights, run_interpolation
    if args.latents:
        raise ValueError("--interpolate reads its own latents: drop --latents")
    refuse_sampling_flags(args)
    pairs, frames, method = (default if getattr(args, name) is None else getattr(args, name)
                             for name, default in INTERPOLATION.items())
    saved = read_latents(args.interpolate)
    check_interpolation(saved, pairs)             # eta = 0, pairs of rows in the file: before any write
    weights = fine_tuned_weights(args.interpolate)
    if weights is not None and args.ckpt is None:     # a joint run: its latents fit its own weights
        cfg["checkpoint"]["path"] = str(weights)
    model, _, ckpt_path = build_noise_model(cfg)
    s = cfg["sampling"]
    # Its own folder by default, one per method: runs/interpolate-faces, runs/interpolate-faces-lerp.
    folder = args.out or s["interpolate_out"] + ("-lerp" if method == "lerp" else "")
    start = FolderStart(Path(folder), results="strip_*.png")   # a failure before any strip undoes config.yaml
    with output_folder(folder, start=start) as out:
        start.creates(out / "config.yaml")
        save_config(cfg, out / "config.yaml")         # --config RUN/config.yaml replays the morphs
        model = model.to(device=device, dtype=dtype).eval()
        with torch.no_grad():
            report = run_interpolation(model, cfg, saved, pairs, frames, method, out, solver=s["solver"],
                                       options=options_from(s["solver"], s), seed=s["seed"])
        report["checkpoint"] = str(ckpt_path)
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
    mid = report.get("midpoints", {})
    ratio = (f"; midpoints' fd-random {mid['ratio_to_fresh']:.2f}x fresh samples', "
             f"{mid['ratio_to_fresh_midpoints']:.2f}x white-noise latents' midpoints") if "ratio_to_fresh" in mid else ""
    inner = report.get("interpolated", {})
    white = (f"; interpolated latents: lag-1 autocorrelation <= {inner['lag1_autocorrelation_max']:.3f}, "
             f"Shapiro-Wilk rejection rate {inner['shapiro_rejection_rate']:.2f}") if inner else ""
    strips = ", ".join(f"strip_{i}_{j}.png" for i, j in (pair["rows"] for pair in report["pairs"]))
    print(f"wrote {strips} and metrics.json into {out} ({method}, {frames} frames, weights "
          f"{ckpt_path}){ratio}{white}")
    return report
