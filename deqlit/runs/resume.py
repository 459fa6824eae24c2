"""The one resume check of train.py, joint runs (train.py --task joint) and invert.py.

A resume restores weights, optimizer, EMA and loop state from the checkpoint (an inversion: the
finished images), but the module, data and Trainer are built from the command line's config: a
changed lr or batch size would go on with the new value while the run folder says otherwise. So
every key of the sections a job reads is compared with the run's saved config.yaml (invert.py:
its run.json, what decides an image's latent) and any difference is refused, naming the saved and
the new value, except the keys that cannot change the results (where the data lives, how often to
checkpoint, log or sample, the accelerator). The step count may grow: that is how a training run
trains longer (train.max_steps; a joint run's trainer.max_steps); an inversion may take more
--num-images (not part of run.json). The saved config.yaml is never rewritten; each resume
appends what it changed to RUN/resumes.yaml.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from deqlit.config import load_config
from deqlit.guards import UserInputError, check_checkpoint_readable
from deqlit.runs.sections import MOVED, resolve

# The sections each job reads; others (sampling, inversion, ...) belong to other commands.
RESULT_SECTIONS = {"train": ("data", "model", "diffusion", "train", "trainer"),
                   "joint": ("data", "model", "diffusion", "checkpoint", "joint", "trainer")}
# The step count that may grow on a resume.
GROWS = {"train": ("train.max_steps", "--max-steps (train.max_steps)"),
         "joint": ("trainer.max_steps", "--max-steps (trainer.max_steps)")}
# Counts that may grow on a resume (a smaller one is refused, naming the saved value).
GROWING_SETS = {"joint.num_images"}
_TRAINER_FREE = {"trainer.accelerator", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
                 "trainer.enable_model_summary", "trainer.profiler", "trainer.max_epochs",
                 "trainer.max_time", "trainer.num_sanity_val_steps", "trainer.check_val_every_n_epoch",
                 "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.max_steps"}
# Keys of those sections that do not change the results.
FREE_KEYS = {
    "train": frozenset({"data.root", "data.num_workers", "train.max_steps", "train.out",
                        "train.checkpoint_every", "train.sample_every", "train.sample_count",
                        "train.sample_timesteps", "train.sample_solver", "train.val_images",
                        "train.log_every_n_steps", "train.metrics_every", "train.metrics",
                        "train.metrics_count", *_TRAINER_FREE}),
    "joint": frozenset({"data.root", "data.num_workers", "data.batch_size", "train.out", "joint.out",
                        "joint.checkpoint_every", "joint.compare_every", "joint.image_every",
                        "joint.kid_every", "joint.kid_samples", "joint.num_workers", "joint.eval_chunk",
                        "joint.metrics_per_image_limit", "joint.max_time_s", "joint.max_process_s",
                        "joint.ckpt", "checkpoint.path", "checkpoint.source", *_TRAINER_FREE}),
}
_MISSING = "(not set)"
# How the processes are laid out: free while the data replicas stay the same (data_replicas).
_LAYOUT_KEYS = frozenset({"trainer.devices", "trainer.num_nodes", "trainer.strategy"})


def differences(saved: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """[(dotted key, saved value, new value)] for every leaf that differs between two nested dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += differences(saved.get(key, _MISSING), now.get(key, _MISSING), f"{prefix}{key}.")
        return out
    return [] if saved == now else [(prefix.rstrip("."), saved, now)]


def listed(changes: list[tuple[str, Any, Any]], limit: int = 8, width: int = 60) -> str:
    """'key (saved a, now b); ...' for the first `limit` changes; a value whose repr is longer than
    `width` characters (a schedule's whole abar array) is cut with '...', so the line stays readable."""
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= width else text[:width - 3] + "..."
    return "; ".join(f"{k} (saved {short(a)}, now {short(b)})" for k, a, b in changes[:limit])


def _trainer_default(key: str) -> Any:
    """lightning.Trainer's default for `trainer.KEY` (a run saved without that key used it)."""
    import lightning as L

    param = inspect.signature(L.Trainer.__init__).parameters.get(key.split(".", 1)[1])
    return _MISSING if param is None or param.default is inspect.Parameter.empty else param.default


def changed_settings(saved: dict[str, Any], new: dict[str, Any], task: str = "train"
                     ) -> list[tuple[str, Any, Any]]:
    """[(key, saved value, new value)] for every key of the job's sections whose value differs
    (a trainer key absent on one side is Lightning's default there)."""
    sections = RESULT_SECTIONS[task]
    out = []
    for key, a, b in differences({s: saved.get(s) or {} for s in sections},
                                 {s: new.get(s) or {} for s in sections}):
        if key.startswith("trainer.") and key.count(".") == 1:
            a = _trainer_default(key) if a == _MISSING else a
            b = _trainer_default(key) if b == _MISSING else b
            if a == b:
                continue
        out.append((key, a, b))
    return out


def saved_config_of(out: Path, ckpt_path: str) -> Optional[Path]:
    """The config.yaml of the run being resumed: in --out, else beside the checkpoint's folder."""
    for candidate in (out / "config.yaml", Path(ckpt_path).resolve().parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def load_saved(path: Path, task: str) -> dict[str, Any]:
    """A run's saved config, resolved as today's configs are (keys that moved since are dropped:
    the run used them under their old name)."""
    cfg = load_config(path)
    for moved in MOVED:
        section, key = moved.split(".")
        (cfg.get(section) or {}).pop(key, None)
    return resolve(cfg, task)


def check_resume(cfg: dict[str, Any], out: Path, ckpt_path: str, task: str = "train") -> dict[str, Any]:
    """Refuse a resume whose settings differ from the run's; return the record to append.

    Raises UserInputError naming each changed key with its saved and new value, or when the
    step count (GROWS) is not above the steps the checkpoint has already trained.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    done = int(ckpt.get("global_step", 0))
    grows, flag = GROWS[task]
    section, key = grows.split(".")
    max_steps = cfg[section].get(key)
    saved_path = saved_config_of(out, ckpt_path)
    now = cfg
    if saved_path is not None:
        saved = load_saved(saved_path, task)
    else:   # a checkpoint without its run folder: its hyperparameters are all there is
        hp = ckpt.get("hyper_parameters", {})
        saved = {"model": hp.get("model"), "diffusion": hp.get("diffusion"),
                 task: {k: v for k, v in hp.items() if k not in ("model", "diffusion")}}
        now = {"model": cfg["model"], "diffusion": cfg["diffusion"],
               task: {k: v for k, v in cfg[task].items() if k in saved[task]}}
    changes = changed_settings(saved, now, task)
    free = FREE_KEYS[task] | (_LAYOUT_KEYS if data_replicas(saved) == data_replicas(cfg) else frozenset())
    refused = [(k, a, b) for k, a, b in changes if k not in free and not _grows(k, a, b)]
    source = saved_path or f"the checkpoint {ckpt_path}"
    if refused:
        start_from = (f"--ckpt {Path(ckpt_path).resolve().parent.parent / 'ema.pt'}" if task == "joint"
                      else f"--init {ckpt_path}")     # a joint run starts from a network's weights
        raise UserInputError(
            f"cannot resume with changed settings that shape the weights: {listed(refused, 100)}. "
            f"Resume with the run's settings (as in {source}), or start a new run with --out "
            f"NEW_FOLDER (add {start_from} to start from these weights)")
    if max_steps is not None and max_steps <= done:
        raise UserInputError(f"{ckpt_path} has trained {done} steps already and {flag} is "
                             f"{max_steps}: to train longer, resume with --max-steps above {done}")
    return {"resumed_at": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": done,
            "checkpoint": str(ckpt_path),
            "changed": {k: {"saved": a, "now": b} for k, a, b in changes}}


def data_replicas(cfg: dict[str, Any]) -> Any:
    """How many copies of the batch a run's processes split the data into: the world over the
    time shards (time shards split each chain, which gives the same weights as one process)."""
    from deqlit.runs.launch import time_shards_of, world_of
    section, parallel = cfg.get("trainer") or {}, cfg.get("parallel") or {}
    world = world_of(section) or 1
    if section.get("strategy") != "ddp_time":
        return world
    return world // max(1, time_shards_of(section, parallel, world))


def _grows(key: str, saved: Any, now: Any) -> bool:
    """A joint run's set of images may grow on a resume (its latents table is padded with new
    rows, joint_module.on_load_checkpoint): more --joint.num_images, or null (the whole split;
    a split that holds fewer images than the checkpoint is refused there)."""
    if key not in GROWING_SETS:
        return False
    return now is None or (isinstance(now, int) and isinstance(saved, int) and now > saved)


def record_resume(out: Path, record: dict[str, Any]) -> None:
    """Append one resume's record to RUN/resumes.yaml (config.yaml keeps the run's start)."""
    path = out / "resumes.yaml"
    with open(path, "a") as fh:
        yaml.safe_dump([record], fh, sort_keys=False)


def resume_checkpoint(resume: str, ckpt_dir: Path) -> str:
    """The checkpoint file --resume names, checked to exist and to open."""
    path = ckpt_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (no earlier run "
                                f"wrote checkpoints to {ckpt_dir}); run without --resume")
    others = sorted(p for p in ckpt_dir.glob("step-*.ckpt") if p != path)
    earlier = f", or resume from an earlier checkpoint with --resume {others[-1]}" if others else ""
    check_checkpoint_readable(path, f"run without --resume and with --out NEW_FOLDER{earlier}")
    return str(path)
