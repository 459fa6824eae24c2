"""The typed sections of a config: every key, its one default, and the check that refuses the rest.

A key's default has one home:
- a LightningModule's or network's constructor signature for what it takes (train: ->
  DiffusionTrainModule, joint: -> JointFineTuneModule, model: -> DDIMUNet, inversion: ->
  InversionSettings), read with inspect, so no list of its arguments is kept here;
- the solvers' signatures for solver options (m, lam, beta, ...): a section lists them unset
  (None), and an unset option is the chosen solver's own default (deq.solvers.options_from);
- a dataclass below for what only the run builder reads (output folder, counts, periods);
- lightning.Trainer's signature for the `trainer:` section, which is taken as it is (never filled),
  except for the defaults a job gives its Trainer (TASK_TRAINER: a joint run's 600 steps).

`resolve(cfg, task)` returns the config with every section filled in and checked: an unknown
section or key raises ConfigError with the close matches, a section that is not a mapping raises,
a value of the wrong type raises (deqlit.config.typed_value). Resolving a resolved config changes
nothing, so the config.yaml a run saves replays it (`--config RUN/config.yaml`).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from deqlit.config import ConfigError, typed_value

_EMPTY = inspect.Parameter.empty


@dataclass
class Data:
    name: str = "faces"
    resolution: int = 32
    channels: int = 1
    batch_size: int = 32            # train.py's batch (--batch-size)
    root: str = "data"
    num_workers: int = 0


@dataclass
class Diffusion:
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_diffusion_timesteps: int = 1000


@dataclass
class Checkpoint:
    path: Optional[str] = None
    ema: bool = True
    source: Optional[str] = None     # where the weights come from, printed when they are missing


@dataclass
class TrainRun:
    """train.py's keys that are not DiffusionTrainModule's."""
    max_steps: int = 10000
    out: str = "runs/train"
    checkpoint_every: int = 250
    steps_per_epoch: int = 250
    log_every_n_steps: Optional[int] = None   # None: follows max_steps (runs/training.py)
    grad_clip: Optional[float] = 1.0
    val_images: Optional[int] = 1024
    init: Optional[str] = None      # start from these weights (fine-tuning)
    metrics_every: int = 0
    metrics: str = "fd-random,kd-random"
    metrics_count: int = 64


@dataclass
class Sampling:
    timesteps: int = 25
    skip: str = "uniform"
    eta: float = 0.0
    solver: str = "newton-scan"
    max_iter: int = 100
    tol: float = 0.001
    max_batch: Optional[int] = 64
    batch_size: Optional[int] = 256   # images per solve (None: all at once); more go in consecutive solves
    num_images: int = 16
    seed: int = 0
    out: str = "runs/sample"
    interpolate_out: str = "runs/interpolate"   # sample.py --interpolate (+ "-lerp" with --interp lerp)


@dataclass
class InversionRun:
    """invert.py's keys that are not InversionSettings'."""
    split: str = "test"
    num_images: Optional[int] = 16
    batch_size: int = 16
    timesteps: int = 10
    skip: str = "uniform"
    eta: float = 0.0
    max_batch: Optional[int] = 64
    save_every: int = 10
    num_workers: int = 0
    merge_limit: int = 4096
    out: str = "runs/invert"


@dataclass
class JointRun:
    """train.py --task joint's keys that are not JointFineTuneModule's."""
    split: str = "test"
    num_images: Optional[int] = None
    batch_size: int = 16
    prior_batch_size: int = 16
    prior_split: str = "train"
    num_workers: int = 0
    reference_images: int = 256
    eval_chunk: int = 64
    metrics_per_image_limit: int = 1000
    latents_on_disk: Any = "auto"     # true | false | auto
    latents_disk_threshold_gb: float = 2.0
    checkpoint_every: int = 50
    max_time_s: Optional[float] = None       # a wall-time budget (benchmarks)
    max_process_s: Optional[float] = None    # a CPU-time budget of this process (benchmarks)
    ckpt: Optional[str] = None
    out: str = "runs/joint"


@dataclass
class Parallel:
    time_shards: Optional[int] = 1   # processes per chain under --trainer.strategy ddp_time
    timeout_s: float = 300.0


@dataclass
class Evaluation:
    fid_weights: Optional[str] = None
    ref_limit: int = 50000


# Keys a section no longer takes, with the key that replaced them.
MOVED = {"joint.accelerator": "trainer.accelerator", "joint.devices": "trainer.devices",
         "joint.max_steps": "trainer.max_steps", "joint.progress_bar": "trainer.enable_progress_bar",
         "joint.log_every_n_steps": "trainer.log_every_n_steps", "train.precision": "trainer.precision"}
# What a job's Trainer uses unless the trainer section says otherwise (shown by --print_config).
# Keys whose value is not of one type (latents_on_disk: true, false or 'auto').
UNTYPED = frozenset({"joint.latents_on_disk"})
TASK_TRAINER = {"joint": {"max_steps": 600, "log_every_n_steps": 1, "enable_model_summary": False}}


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _signature(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """{argument: default} of a constructor (_EMPTY where it has none), less `skip`."""
    params = inspect.signature(fn).parameters
    return {k: p.default for k, p in params.items()
            if k not in ("self", *skip) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _solver_options() -> dict[str, Any]:
    """Every solver's options, unset: the solver chosen then uses its own defaults."""
    from deqlit.deq.solvers import SOLVERS, option_defaults
    return {k: None for name in SOLVERS for k in option_defaults(name)}


def _model_keys() -> dict[str, Any]:
    from deqlit.models.unet import DDIMUNet
    return {**_signature(DDIMUNet), "format": _EMPTY}   # allowed, never filled in: "diffusers"


def _train_keys() -> dict[str, Any]:
    from deqlit.lit.train_module import DiffusionTrainModule
    return {**_signature(DiffusionTrainModule, ("model", "diffusion")), **_fields(TrainRun)}


def _inversion_keys() -> dict[str, Any]:
    from deqlit.deq.inversion import InversionSettings
    settings = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(InversionSettings) if f.name != "solver_options"}
    return {**_solver_options(), **settings, **_fields(InversionRun)}


def _joint_keys() -> dict[str, Any]:
    from deqlit.lit.joint_module import JointFineTuneModule
    module = _signature(JointFineTuneModule, ("model", "schedule_abar", "num_images", "image_shape",
                                              "solver_options", "latents_store"))
    return {**_solver_options(), **module, **_fields(JointRun)}


# section -> its keys and defaults (a function: the constructors are imported when needed)
SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "data": lambda: _fields(Data), "model": _model_keys, "diffusion": lambda: _fields(Diffusion),
    "checkpoint": lambda: _fields(Checkpoint), "train": _train_keys,
    "sampling": lambda: {**_solver_options(), **_fields(Sampling)}, "inversion": _inversion_keys,
    "joint": _joint_keys, "parallel": lambda: _fields(Parallel),
    "evaluation": lambda: _fields(Evaluation), "trainer": dict,
}
MODULE_BOUND = {"train": "DiffusionTrainModule", "joint": "JointFineTuneModule"}


def _close(word: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, options, n=3)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def module_arguments(section: dict[str, Any], module: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of a resolved section that `module`'s constructor takes (read from its signature)."""
    accepted = _signature(module, skip)
    return {k: v for k, v in section.items() if k in accepted}


def _check_section(name: str, given: Any) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ConfigError(f"config section {name!r} must be a mapping of keys (key: value lines), "
                          f"got a {type(given).__name__}: {given!r}")
    return given


def resolve_trainer(section: dict[str, Any], task: Optional[str]) -> dict[str, Any]:
    """The trainer section as given, keys checked against lightning.Trainer, plus the task's defaults."""
    from deqlit.runs.trainer import trainer_kwargs
    return {**TASK_TRAINER.get(task or "", {}), **trainer_kwargs(section)}


def resolve(cfg: Any, task: Optional[str] = None) -> dict[str, Any]:
    """Every section of `cfg` filled in with its defaults and checked (module docstring).

    task: 'train', 'joint', 'invert' or 'sample' (the job whose Trainer defaults apply), or None.
    Raises ConfigError naming the section or key and, where there are any, the close matches.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config is a mapping of sections (data:, model:, ...), got a "
                          f"{type(cfg).__name__}")
    unknown = [k for k in cfg if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}{_close(unknown[0], list(SECTIONS), '')}"
                          f" Sections: {', '.join(SECTIONS)}")
    out: dict[str, Any] = {}
    for name, keys_of in SECTIONS.items():
        given = _check_section(name, cfg.get(name))
        if name == "trainer":
            out[name] = resolve_trainer(given, task)
            continue
        keys = keys_of()
        if name == "model" and given.get("format") == "diffusers":   # the folder's own config
            out[name] = dict(given)
            continue
        for key in given:
            if f"{name}.{key}" in MOVED:
                moved = MOVED[f"{name}.{key}"]
                raise ConfigError(f"{name}.{key} is a Trainer setting now: use --{moved} {given[key]} "
                                  f"(or `{moved.split('.')[1]}:` in the config's trainer section)")
            if key not in keys:
                raise ConfigError(f"unknown key {key!r} in section {name} (--{name}.{key})"
                                  f"{_close(key, list(keys), '--' + name + '.')}")
        section = {}
        for key, default in keys.items():
            if key in given:
                value = given[key]
                if default is not _EMPTY and not isinstance(default, dict) and f"{name}.{key}" not in UNTYPED:
                    value = typed_value(default, value, repr(value) if not isinstance(value, str) else value,
                                        f"{name}.{key}")
                section[key] = value
            elif default is not _EMPTY:
                section[key] = default
        out[name] = section
    return out


def print_config(cfg: dict[str, Any]) -> str:
    """The resolved config as the YAML text that `--config FILE` reads back."""
    import yaml
    return yaml.safe_dump(cfg, sort_keys=False)
