"""Builds and runs an inversion from a resolved config (invert.py), and writes its outputs.

Order matters for the user: every value is checked, then the inputs (dataset, checkpoint), then
the output folder, all before anything is written or computed; then the folder is locked for the
run, the Trainer predicts batch by batch, and the parts are merged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from deqlit.config import save_config
from deqlit.deq.degradations import (TASK_OPTIONS, check_factor_divides, check_random_masks, fit_mask, mask_digest,
                                     read_mask_file)
from deqlit.deq.inversion import InversionSettings
from deqlit.deq.solvers import SolverDivergedError, options_from
from deqlit.diffusion.chain import Chain
from deqlit.guards import NonFiniteError, OutputFolderError, RunInterrupted, UserInputError
from deqlit.runs.folder_lock import folder_lock
from deqlit.runs.guards import RUN_FILES, FolderStart, check_output_dir, interrupts_as_exceptions, refuse_existing_run
from deqlit.lit.inversion_data import InversionDataModule
from deqlit.lit.inversion_module import InversionModule
from deqlit.lit.inversion_outputs import InversionWriter, finished_indices, merge_outputs
from deqlit.runs.launch import launched_worker, on_rank_zero_of, prepare_launch, time_shards_of
from deqlit.runs.resume import differences, listed
from deqlit.runs.sections import resolve
from deqlit.runs.trainer import build_trainer, note_tolerance
from deqlit.models.build import build_noise_model, resolve_checkpoint, schedule_from_config

RUN_FILE = "run.json"   # what decides the results; a resume must match it
# run.json's key for the pixels of a mask file: a file edited between Ctrl-C and --resume would
# otherwise give the resumed images another mask than the finished ones, under the same path.
MASK_PIXELS = "mask_file_pixels"


class MissingInputsError(FileNotFoundError):
    """The dataset and/or the checkpoint that a run needs are not on disk."""


def settings_from(inv: dict[str, Any]) -> InversionSettings:
    """The inversion section of a config (resolved: runs.sections) -> validated InversionSettings."""
    inv = resolve({"inversion": inv})["inversion"]
    fields = {f.name for f in dataclasses.fields(InversionSettings)} - {"solver_options"}
    values = {k: inv[k] for k in fields}
    # The exact method is its own start: --method exact needs no --init.
    values["init"] = "exact" if inv["method"] == "exact" else inv["init"]
    values["exact"] = dict(inv["exact"] or {})
    return InversionSettings(**values, solver_options=options_from(inv["solver"], inv)).validate()


def check_counts(inv: dict[str, Any]) -> None:
    for key in ("num_images", "batch_size", "save_every"):
        value = inv[key]
        if key != "num_images" or value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"inversion.{key} must be a positive integer, got {value!r}")
    if inv["max_batch"] is not None and (not isinstance(inv["max_batch"], int) or inv["max_batch"] < 1):
        raise ValueError(f"inversion.max_batch must be a positive integer or null, got {inv['max_batch']!r}")


def check_factor(settings: InversionSettings, resolution: int) -> None:
    """Checked here, before the output folder is touched, rather than at the first batch."""
    if settings.task == "super-resolution":
        check_factor_divides(settings.factor, resolution, resolution)


def check_mask(settings: InversionSettings, resolution: int, quiet: bool = False) -> Optional[str]:
    """A mask file is read and checked here, before the output folder is touched, rather than at
    the first batch, where a missing or unusable file stopped a run that had written run.json
    (and so blocked its corrected rerun). A file of another size is resized: said unless quiet.
    Returns the digest of the mask the run uses (mask_digest; None without a mask file)."""
    if settings.task != "inpaint" or settings.mask == "center" or settings.mask.startswith("random:"):
        return None
    mask = read_mask_file(settings.mask)
    fitted = fit_mask(mask, resolution, resolution, settings.mask)
    height, width = mask.shape[-2:]
    if (height, width) != (resolution, resolution) and not quiet:
        print(f"note: mask file {settings.mask} is {width}x{height} pixels: resized to the images' "
              f"{resolution}x{resolution} (nearest neighbours)")
    return mask_digest(fitted)


def check_random_masks_of_run(cfg: dict, settings: InversionSettings) -> None:
    """--mask random:P: the masks of the images the run inverts, checked (check_random_masks) once
    the dataset is known to be there, before the output folder is touched."""
    if settings.task != "inpaint" or not settings.mask.startswith("random:"):
        return
    from deqlit.data.streaming import split_dataset
    data, inv = cfg["data"], cfg["inversion"]
    total = len(split_dataset(data["name"], inv["split"], data["resolution"], data["channels"], data["root"]))
    count = total if inv["num_images"] is None else min(inv["num_images"], total)
    check_random_masks(settings.mask, data["resolution"], data["resolution"], range(count), settings.seed)


def check_inputs(cfg: dict, ckpt: Optional[str] = None) -> None:
    """One message naming everything that is missing: the dataset and the checkpoint."""
    from deqlit.data.folders import BUNDLED, DatasetNotFoundError, load_local_dataset
    problems = []
    data = cfg["data"]
    if data["name"] not in BUNDLED:
        try:  # reading one image finds a missing folder or file list, with the loader's own words
            load_local_dataset(data["name"], cfg["inversion"]["split"], data["resolution"],
                               data["channels"], data["root"], limit=1)
        except DatasetNotFoundError as err:
            problems.append(str(err))
    ckpt_text = ckpt or cfg["checkpoint"]["path"]
    if ckpt_text and not resolve_checkpoint(ckpt_text).exists():
        problems.append(f"checkpoint: {resolve_checkpoint(ckpt_text)} does not exist. "
                        f"{cfg['checkpoint']['source'] or ''}".strip())
    if problems:
        raise MissingInputsError(
            "cannot start: deqlit never downloads, so these must be on this machine first.\n- "
            + "\n- ".join(problems)
            + "\nPut them there, or point elsewhere with --data.root DIR and --ckpt PATH.")


def run_identity(cfg: dict, settings: InversionSettings, chain: Chain,
                 mask_pixels: Optional[str] = None) -> dict[str, Any]:
    """Everything that decides an image's latent: with a mask file, what it holds (mask_pixels,
    check_mask's digest), not only its path. Not in it: num_images and batch_size (results are
    per image), max_batch, trainer and output options."""
    data = cfg["data"]
    return {"settings": settings.to_dict(), "chain": chain.to_dict(),
            "data": {"name": data["name"], "split": cfg["inversion"]["split"],
                     "resolution": data["resolution"], "channels": data["channels"]},
            "checkpoint": str(resolve_checkpoint(cfg["checkpoint"]["path"] or "")),
            "checkpoint_ema": cfg["checkpoint"]["ema"],
            "model": cfg["model"], "diffusion": cfg["diffusion"],
            **({MASK_PIXELS: mask_pixels} if mask_pixels else {})}


def check_output_folder(out: Path, identity: dict[str, Any], resume: bool) -> None:
    """Refuse to mix runs: a new run into a used folder, or a resume with other settings."""
    holds_run = (out / RUN_FILE).is_file() or (out / "latents.pt").is_file() or any((out / "latents").glob("*.pt"))
    if not resume:
        if holds_run:
            raise OutputFolderError(f"{out} holds an earlier inversion: add --resume to continue it, "
                                    f"or --out NEW_FOLDER for a new run")
        refuse_existing_run(out, RUN_FILES)      # another command's run (train.py's), or one in use
        return
    if not (out / RUN_FILE).is_file():
        raise FileNotFoundError(f"cannot resume: {out / RUN_FILE} does not exist (no inversion was "
                                f"started in {out}); run without --resume")
    try:
        saved = json.loads((out / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OutputFolderError(f"cannot resume: {out / RUN_FILE} is unreadable ({err}); start over "
                                f"with another --out") from err
    now = json.loads(json.dumps(identity))
    if MASK_PIXELS not in saved:       # a run.json of a version that recorded the mask file's path only
        now.pop(MASK_PIXELS, None)
    changed = differences(recorded_settings_only(saved), now)
    if changed:
        raise UserInputError(f"cannot resume with changed settings: {listed(changed)}. Use the saved "
                             f"settings (see {out / 'config.yaml'}) to continue it, or --out NEW_FOLDER "
                             f"for a new run")


def recorded_settings_only(saved: dict[str, Any]) -> dict[str, Any]:
    """A run.json as this version writes it: earlier versions also recorded the options of the
    tasks a run did not perform (a reconstruction's mask), which InversionSettings.to_dict drops,
    and left exact.on_fail out when it was the default ('warn', which this version records)."""
    settings = saved.get("settings")
    if not isinstance(settings, dict):
        return saved
    task = settings.get("task", "reconstruct")
    kept = {k: v for k, v in settings.items() if TASK_OPTIONS.get(k, task) == task}
    if isinstance(kept.get("exact"), dict) and "on_fail" not in kept["exact"]:
        kept["exact"] = {**kept["exact"], "on_fail": "warn"}
    return {**saved, "settings": kept}


def check_time_shardable(settings: InversionSettings, shards: int, quiet: bool = False) -> InversionSettings:
    """The settings that `shards` time shards run. The baseline runs the T steps one after another
    (it backpropagates through the sequential chain): refused. Exact inversion per step does too,
    but all-timesteps mode solves the same fixed point (x_1..x_T of the inverse chain) as one
    batched solve that the shards split: per-step becomes all-timesteps, with one printed line."""
    if shards > 1 and settings.method == "baseline":
        raise ValueError(f"the baseline backpropagates through the sequential chain, which cannot be "
                         f"split over {shards} time shards: use --method deq, or --parallel.time_shards 1 "
                         f"to split the images over the processes instead")
    uses_exact = settings.method == "exact" or settings.init == "exact"
    if shards <= 1 or not uses_exact or settings.exact.get("mode", "all-timesteps") != "per-step":
        return settings
    # The per-step solver and max_iter were chosen for one state a step: the switch takes the
    # all-timesteps ones (triangular-anderson: 93.7 dB on the 16 faces at T = 10 in 226 network
    # evaluations an image, anderson 89.5 dB in 310). An explicit all-timesteps mode is kept as set.
    from deqlit.deq.inverse_map import DEFAULT_MAX_ITER
    calls = DEFAULT_MAX_ITER["all-timesteps"]
    exact = {**settings.exact, "mode": "all-timesteps", "solver": "triangular-anderson", "max_iter": calls}
    if not quiet:
        print(f"note: exact inversion per step solves the T steps one after another, which {shards} time "
              f"shards cannot split: solving the same fixed point over all timesteps instead (exact.mode "
              f"all-timesteps, solver triangular-anderson, at most {calls} batched calls); choose with "
              f"--inversion.exact.mode all-timesteps --inversion.exact.solver triangular-anderson|anderson|picard "
              f"--inversion.exact.max_iter N, or split the images instead with --parallel.time_shards 1")
    return dataclasses.replace(settings, exact=exact).validate()


class SaveOnInterrupt(Callback):
    """Ctrl-C / SIGTERM (or any error) in the middle of a batch: save the batch's state."""

    def __init__(self) -> None:
        self.saved: Optional[Path] = None

    def on_exception(self, trainer, module: InversionModule, exception: BaseException) -> None:
        if isinstance(exception, (NonFiniteError, SolverDivergedError)):
            return         # diverged latents are no state to resume from (the last periodic one stays)
        self.saved = module.save_partial(on_error=True)


def run_inversion(cfg: dict, resume: bool = False, progress: bool = True,
                  callbacks: Optional[list[Callback]] = None, command: str = "invert.py"
                  ) -> tuple[dict[str, Any], Path]:
    """Run (or resume) the inversion a config describes; returns (metrics, run folder)."""
    cfg = resolve(cfg, "invert")
    inv, data = cfg["inversion"], cfg["data"]
    out = Path(inv["out"])
    # 1. values, 2. inputs, 3. the output folder: nothing written before all three pass.
    settings = settings_from(inv)
    check_counts(inv)
    check_factor(settings, data["resolution"])
    mask_pixels = check_mask(settings, data["resolution"], quiet=launched_worker())
    chain = Chain.build(schedule_from_config(cfg["diffusion"]), inv["timesteps"], inv["skip"], inv["eta"])
    # A method that cannot run on time shards is refused before the count of processes is read:
    # no number of processes would run it.
    settings = check_time_shardable(settings, time_shards_of(cfg["trainer"], cfg["parallel"]),
                                    quiet=launched_worker())
    # torchrun / srun: the world is joined once the inputs are checked, so that rank 0's checks
    # and its list of finished images reach every process before any of them starts.
    launch = prepare_launch(cfg, join=False)
    check_inputs(cfg)
    check_random_masks_of_run(cfg, settings)
    # The network is read before anything is written: a refused or mismatched checkpoint leaves
    # --out as it was (no run.json that a later run would take for an earlier inversion).
    model, schedule, _ = build_noise_model(cfg)
    chain.check_schedule(schedule)
    identity = run_identity(cfg, settings, chain, mask_pixels)
    if launch.launched is not None:
        launch = prepare_launch(cfg)
    worker = launched_worker()

    def check_folder() -> None:
        check_output_folder(out, identity, resume)
        check_output_dir(out)
    start = FolderStart(out, results="latents/part*.pt")  # part-* and partial-*; before the folder is made
    on_rank_zero_of(launch, check_folder)
    with (contextlib.nullcontext() if worker else start.undone_on_failure()), \
            (contextlib.nullcontext() if worker else folder_lock(out, command)):
        if not worker:
            start.creates(out / "latents", out / RUN_FILE, out / "config.yaml", out / "tb")
            (out / "latents").mkdir(exist_ok=True)
        if not resume and not worker:
            (out / RUN_FILE).write_text(json.dumps(identity, indent=2))
            save_config(cfg, out / "config.yaml")
        # Every process inverts the images that rank 0 finds unfinished (read once, by rank 0).
        done = on_rank_zero_of(launch, lambda: finished_indices(out / "latents"), workers_too=True)
        datamodule = InversionDataModule(data["name"], inv["split"], data["resolution"],
                                         data["channels"], data["root"],
                                         num_images=inv["num_images"], batch_size=inv["batch_size"],
                                         num_workers=inv["num_workers"], skip=done)
        module = InversionModule(model, chain, settings, max_batch=inv["max_batch"], mask_pixels=mask_pixels,
                                 state_dir=out / "latents", save_every=inv["save_every"],
                                 log_every=cfg["trainer"].get("log_every_n_steps", 1))
        interrupt = SaveOnInterrupt()
        trainer = build_trainer(
            launch, inference_mode=False,
            logger=TensorBoardLogger(str(out), name="tb", version=0),
            callbacks=[InversionWriter(out / "latents", chain.to_dict(), identity["settings"]),
                       interrupt, *(callbacks or [])],
            enable_progress_bar=progress, enable_model_summary=False, enable_checkpointing=False,
            use_distributed_sampler=False)   # InversionDataModule splits the images itself
        if settings.method == "deq":            # its forward solves; exact's misses are named at the end
            note_tolerance(trainer, inv.get("tol"), "--inversion.tol")
        datamodule.setup("predict")
        # The images split over the data replicas; the time shards of a replica share its images.
        shards = time_shards_of(launch.section, launch.parallel, trainer.world_size)
        replicas = max(1, trainer.world_size // shards)
        if 0 < len(datamodule.positions) < replicas:
            # Lightning's prediction loop needs a batch on every process.
            raise ValueError(f"{replicas} data replica(s) ({trainer.world_size} processes / {shards} time "
                             f"shard(s)) for {len(datamodule.positions)} image(s) left to invert: use at "
                             f"most {len(datamodule.positions) * shards} processes")
        with interrupts_as_exceptions() as seen, warnings.catch_warnings():
            # Expected here: the noise network stays in eval mode on purpose.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            try:
                if datamodule.positions:      # a resumed run may have nothing left
                    trainer.predict(module, datamodule=datamodule, return_predictions=False)
            except BaseException:
                if seen.signum is not None and interrupt.saved is not None:
                    print(f"saved the unfinished batch's state to {interrupt.saved}")
                raise
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return {}, out
        metrics = merge_outputs(out, settings.method, chain.T, inv["merge_limit"])
    return metrics, out
