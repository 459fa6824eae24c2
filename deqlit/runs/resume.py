"""`train.py --resume`: the settings that shape the weights must be those the run started with.

A resume restores weights, optimizer, EMA and loop state from the checkpoint, but the module,
data and Trainer are built from the command line's config: a changed lr or batch size would train
on with the new value while the run folder says otherwise. So every key of the sections train.py
reads is compared with the run's saved config.yaml and any difference is refused, except the keys
that cannot change the weights (where the data lives, how often to checkpoint, log or sample, the
accelerator). max_steps may grow: that is how a run trains longer. The saved config.yaml is never
rewritten; each resume appends what it changed to RUN/resumes.yaml.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from deqlit.config import load_config
from deqlit.guards import UserInputError

# The sections train.py reads; others (sampling, inversion, ...) belong to other commands.
RESULT_SECTIONS = ("data", "model", "diffusion", "train", "trainer")
# Keys of those sections that do not change the trained weights.
FREE_KEYS = frozenset({
    "data.root", "data.num_workers",
    "train.max_steps", "train.out", "train.checkpoint_every", "train.sample_every",
    "train.sample_count", "train.sample_timesteps", "train.sample_solver", "train.val_images",
    "train.log_every_n_steps", "train.metrics_every", "train.metrics", "train.metrics_count",
    "trainer.accelerator", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.profiler", "trainer.max_epochs", "trainer.max_time",
    "trainer.num_sanity_val_steps", "trainer.check_val_every_n_epoch", "trainer.val_check_interval",
    "trainer.limit_val_batches",
})
_MISSING = "(not set)"


def flatten(cfg: dict[str, Any], sections: tuple[str, ...] = RESULT_SECTIONS) -> dict[str, Any]:
    """{'section.key': value} for the keys of `sections` (lists and nested dicts are one value)."""
    return {f"{section}.{key}": value for section in sections
            for key, value in (cfg.get(section) or {}).items()}


def _trainer_default(key: str) -> Any:
    """lightning.Trainer's default for `trainer.KEY` (a run saved without that key used it)."""
    import lightning as L

    param = inspect.signature(L.Trainer.__init__).parameters.get(key.split(".", 1)[1])
    return _MISSING if param is None or param.default is inspect.Parameter.empty else param.default


def changed_settings(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """[(key, saved value, new value)] for every key of the read sections whose value differs."""
    old, now = flatten(saved), flatten(new)
    out = []
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key, _MISSING), now.get(key, _MISSING)
        if key.startswith("trainer."):
            a = _trainer_default(key) if a == _MISSING else a
            b = _trainer_default(key) if b == _MISSING else b
        if a != b:
            out.append((key, a, b))
    return out


def saved_config_of(out: Path, ckpt_path: str) -> Optional[Path]:
    """The config.yaml of the run being resumed: in --out, else beside the checkpoint's folder."""
    for candidate in (out / "config.yaml", Path(ckpt_path).resolve().parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def check_resume(cfg: dict[str, Any], out: Path, ckpt_path: str) -> dict[str, Any]:
    """Refuse a resume whose settings differ from the run's; return the record to append.

    Raises UserInputError naming each changed key with its saved and new value, or when
    train.max_steps is not above the steps the checkpoint has already trained.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    done = int(ckpt.get("global_step", 0))
    max_steps = cfg["train"].get("max_steps", 10000)
    saved_path = saved_config_of(out, ckpt_path)
    if saved_path is not None:
        saved = load_config(saved_path)
    else:   # a checkpoint without its run folder: its hyperparameters are all there is
        hp = ckpt.get("hyper_parameters", {})
        saved = {"model": hp.get("model"), "diffusion": hp.get("diffusion"),
                 "train": {k: v for k, v in hp.items() if k not in ("model", "diffusion")}}
        cfg = {"model": cfg["model"], "diffusion": cfg["diffusion"],
               "train": {k: v for k, v in cfg["train"].items() if k in saved["train"]}}
    changes = changed_settings(saved, cfg)
    refused = [(k, a, b) for k, a, b in changes if k not in FREE_KEYS]
    source = saved_path or f"the checkpoint {ckpt_path}"
    if refused:
        listed = "; ".join(f"{k} (saved {a!r}, now {b!r})" for k, a, b in refused)
        raise UserInputError(
            f"cannot resume with changed settings that shape the weights: {listed}. Resume with "
            f"the run's settings (as in {source}), or start a new run with --out NEW_FOLDER "
            f"(add --init {ckpt_path} to start from these weights)")
    if max_steps <= done:
        raise UserInputError(f"{ckpt_path} has trained {done} steps already and --max-steps "
                             f"(train.max_steps) is {max_steps}: to train longer, resume with "
                             f"--max-steps above {done}")
    return {"resumed_at": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": done,
            "checkpoint": str(ckpt_path),
            "changed": {k: {"saved": a, "now": b} for k, a, b in changes}}


def record_resume(out: Path, record: dict[str, Any]) -> None:
    """Append one resume's record to RUN/resumes.yaml (config.yaml keeps the run's start)."""
    path = out / "resumes.yaml"
    with open(path, "a") as fh:
        yaml.safe_dump([record], fh, sort_keys=False)
