"""The Trainer from a config's `trainer:` section: every Trainer argument can be set there or on
the command line (`--trainer.accelerator gpu --trainer.devices 4 --trainer.precision 16-mixed`)."""
from __future__ import annotations

import inspect
from typing import Any

import lightning as L

# What each job decides itself; a config value for these would be overridden silently.
JOB_OWNED = {"callbacks", "logger", "default_root_dir", "enable_checkpointing", "inference_mode"}


def trainer_kwargs(section: dict[str, Any] | None) -> dict[str, Any]:
    """Check a `trainer:` section against Trainer's signature; unknown keys raise, naming them."""
    section = dict(section or {})
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(section) - accepted)
    if unknown:
        import difflib
        hints = [f"{k} (did you mean {', '.join(difflib.get_close_matches(k, accepted, 2))}?)"
                 if difflib.get_close_matches(k, accepted, 2) else k for k in unknown]
        raise ValueError(f"unknown trainer option(s): {', '.join(hints)}; the trainer section takes "
                         f"lightning.Trainer's arguments")
    owned = sorted(set(section) & JOB_OWNED)
    if owned:
        raise ValueError(f"trainer option(s) {', '.join(owned)} are set by the command itself; "
                         f"remove them from the trainer section")
    return section


def build_trainer(section: dict[str, Any] | None, parallel: dict[str, Any] | None = None,
                  **job: Any) -> L.Trainer:
    """L.Trainer(**config section, **what the job sets); the config's values win for shared keys
    such as devices, so a user can always override them. strategy 'ddp_time' becomes the
    time-sharding strategy with the config's parallel.time_shards."""
    kwargs = {**job, **trainer_kwargs(section)}
    if kwargs.get("strategy") == "ddp_time":
        from deqlit.lit.time_strategy import DDPTimeStrategy
        kwargs["strategy"] = DDPTimeStrategy(time_shards=(parallel or {}).get("time_shards"))
    return L.Trainer(**kwargs)
