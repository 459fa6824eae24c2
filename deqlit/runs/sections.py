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


# ---- option mappings inside a section (inversion.exact, joint.adjoint) -------------------------
# Their keys are checked at parse time like a section's: a misspelt one would otherwise reach the
# solver in the middle of the run (a TypeError after minutes of work) or be silently dropped.
def _resolve_exact(exact: Any) -> dict[str, Any]:
    """inversion.exact checked (deq.inversion.check_exact_options), typed against exact_invert's
    defaults, with on_fail filled in (the one default the run, not exact_invert, decides)."""
    from deqlit.deq.inversion import check_exact_options, exact_option_defaults
    exact = _check_mapping("inversion.exact", exact)
    try:
        check_exact_options(exact)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    defaults = exact_option_defaults(exact.get("solver"))
    typed = {k: typed_value(defaults[k], v, v if isinstance(v, str) else repr(v), f"inversion.exact.{k}")
             if defaults[k] is not None and k != "init" else v for k, v in exact.items()}
    return {**typed, "on_fail": typed.get("on_fail", defaults["on_fail"])}


def _resolve_adjoint(adjoint: Any) -> Optional[dict[str, Any]]:
    """joint.adjoint (None: deq.grad's default) with its keys checked against its solver's options."""
    from deqlit.deq.grad import SWEEP
    from deqlit.deq.solvers import SOLVERS, option_defaults
    if adjoint is None:
        return None
    adjoint = _check_mapping("joint.adjoint", adjoint)
    solver = adjoint.get("solver", "picard")
    if solver != SWEEP and solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r} for --joint.adjoint.solver; use one of "
                          f"{SWEEP}, {', '.join(SOLVERS)}")
    accepted = ["solver", *([] if solver == SWEEP else option_defaults(solver))]
    for key in adjoint:
        if key not in accepted:
            takes = "no options" if solver == SWEEP else "the options " + ", ".join(accepted[1:])
            raise ConfigError(f"unknown key {key!r} in joint.adjoint (--joint.adjoint.{key}): its "
                              f"solver {solver!r} takes {takes}{_close(str(key), accepted, '--joint.adjoint.')}")
    return dict(adjoint)


def _check_mapping(where: str, given: Any) -> dict[str, Any]:
    """An option mapping inside a section (inversion.exact): {} for None, else it must be a dict."""
    return _as_mapping(given, lambda: f"{where} must be a mapping of options (set them as --{where}.KEY "
                                      f"value), got {given!r}")


NESTED: dict[str, Callable[[Any], Any]] = {"inversion.exact": _resolve_exact, "joint.adjoint": _resolve_adjoint}


def _close(word: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, options, n=3)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def module_arguments(section: dict[str, Any], module: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of a resolved section that `module`'s constructor takes (read from its signature)."""
    accepted = _signature(module, skip)
    return {k: v for k, v in section.items() if k in accepted}


def _check_section(name: str, given: Any) -> dict[str, Any]:
    return _as_mapping(given, lambda: f"config section {name!r} must be a mapping of keys (key: value "
                                      f"lines), got a {type(given).__name__}: {given!r}")


def _as_mapping(given: Any, refusal: Callable[[], str]) -> dict[str, Any]:
    """`given` as a mapping: {} for None (an empty YAML section), else ConfigError(refusal())."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ConfigError(refusal())
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
            if f"{name}.{key}" in NESTED and key in section:
                section[key] = NESTED[f"{name}.{key}"](section[key])
        out[name] = section
    return out


def print_config(cfg: dict[str, Any]) -> str:
    """The resolved config as the YAML text that `--config FILE` reads back."""
    import yaml
    return yaml.safe_dump(cfg, sort_keys=False)


# ---- keys typed for another command ------------------------------------------------------------
# The sections of a config that train.py's tasks never read, with what reads them: typed on
# train.py's command line they would do nothing (the same keys in a config file are defaults).
NOT_READ_BY = {"train": {"joint": "--task joint", "inversion": "invert.py", "sampling": "sample.py"},
               "joint": {"train": "--task train", "inversion": "invert.py", "sampling": "sample.py"}}


def refuse_unread(task: str, typed: dict[str, str], flags: Optional[dict[str, str]] = None) -> None:
    """Refuse what the command line set that --task `task` never reads, in one line naming each
    flag and what reads it. typed: {dotted key: the word that set it} (deqlit.cli.typed_keys);
    flags: {a named flag given: what reads it}, e.g. {'--ckpt': '--task joint (...)'}."""
    from deqlit.guards import unread_flags
    readers: dict[str, list[str]] = {}
    for flag, reader in (flags or {}).items():
        readers.setdefault(reader, []).append(flag)
    for key, word in typed.items():
        reader = NOT_READ_BY.get(task, {}).get(key.split(".", 1)[0])
        if reader is not None:
            readers.setdefault(f"{reader} (the {key.split('.', 1)[0]} section)", []).append(word)
    if readers:
        raise unread_flags(readers, f"with --task {task}", "run the task or script named")


def refuse_other_solvers_options(typed: dict[str, str], section: str, solver: str, choice: str) -> None:
    """A typed --SECTION.KEY that is an option of other solvers only (--sampling.jacobian with
    picard, --joint.m with newton-scan) would be ignored and recorded as if used: refuse it, naming
    the solvers that take it. typed: deqlit.cli.typed_keys; choice: the flag that picks `solver`
    ('--solver', '--joint.solver'). (The config file lists every solver's options: those are
    defaults, never refused.)"""
    from deqlit.deq.solvers import solvers_taking
    from deqlit.guards import unread_flags
    readers: dict[str, list[str]] = {}
    for key, flag in typed.items():
        where, _, name = key.partition(".")
        owners = solvers_taking(name)
        if where == section and owners and solver not in owners:
            readers.setdefault(f"{choice} {' or '.join(owners)}", []).append(flag)
    if readers:
        raise unread_flags(readers, f"with {choice} {solver}", "choose a solver that reads {them}")


def refuse_unread_adjoint(joint: dict, typed: dict[str, str]) -> None:
    """--joint.adjoint[.KEY] configures ift's adjoint solve, which a onestep run makes only for
    --joint.compare_every's cosine: typed for a run that never solves it, it would do nothing."""
    from deqlit.guards import unread_flags
    given = sorted({word for key, word in typed.items() if key.split(".")[:2] == ["joint", "adjoint"]})
    if given and joint.get("grad") != "ift" and not joint.get("compare_every"):
        raise unread_flags({"--joint.grad ift, or --joint.compare_every N (its cosine against ift)": given},
                           f"with --joint.grad {joint.get('grad')} and --joint.compare_every 0",
                           "set what reads {them}")
