"""YAML configs with command-line overrides.

A config is a nested dict read from configs/NAME.yaml. Any key can be overridden from the command
line with a dotted path: `--train.lr 1e-4`, `--model.ch_mult [1,2,2]`, or `--train.lr=1e-4`.
Values are parsed as YAML, so numbers, lists and booleans keep their types.
"""
from __future__ import annotations

import copy
import difflib
import warnings
import re
from pathlib import Path
from typing import Any

import yaml

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def config_dirs() -> list[Path]:
    return [d for d in (REPO_CONFIGS,) if d.is_dir()]


def find_config(name: str) -> Path:
    """configs/<name>.yaml for a dataset name such as 'faces' or 'celeba'."""
    candidates = [d / f"{name}.yaml" for d in config_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted({p.stem for d in config_dirs() for p in d.glob("*.yaml")})
    raise FileNotFoundError(f"no config for {name!r}; known: {', '.join(known)}. "
                            f"Pass --config FILE for your own YAML")


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as fh:
        cfg = yaml.load(fh, Loader=_Loader) or {}
    base = cfg.pop("base", None)
    if base:  # a config may extend another one, named relative to itself
        parent = load_config(path.parent / base)
        cfg = merge(parent, cfg)
    return cfg


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    """cfg['a']['b'] = value for dotted = 'a.b'; the section must exist, the key may be new."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        if part not in node or not isinstance(node[part], dict):
            raise KeyError(f"unknown config section {part!r} in --{dotted}; sections: "
                           f"{', '.join(k for k, v in node.items() if isinstance(v, dict))}")
        node = node[part]
    node[leaf] = value


def get_path(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(cfg: dict, args: list[str]) -> dict:
    """Apply `--a.b value` / `--a.b=value` pairs; any other argument raises."""
    cfg = copy.deepcopy(cfg)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise SystemExit(f"unrecognized argument {arg!r}: config overrides look like "
                             f"--section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise SystemExit(f"{arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        warn_if_new_key(cfg, key)
        set_path(cfg, key, parse_value(raw))
    return cfg


def warn_if_new_key(cfg: dict, dotted: str) -> None:
    """A key the config does not have is allowed (optional keys exist) but is likely a typo: say so."""
    *parents, leaf = dotted.split(".")
    node = get_path(cfg, ".".join(parents)) if parents else cfg
    if isinstance(node, dict) and leaf not in node:
        close = difflib.get_close_matches(leaf, [k for k in node], n=3)
        hint = f"; did you mean {', '.join('--' + '.'.join(parents + [c]) for c in close)}?" if close else ""
        warnings.warn(f"--{dotted} is not a key of the config, so it is added as a new key "
                      f"(only optional keys are read that way){hint}", UserWarning, stacklevel=3)


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
