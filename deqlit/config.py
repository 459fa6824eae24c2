"""YAML configs with command-line overrides.

A config is a nested dict read from configs/NAME.yaml. Any key can be overridden from the command
line with a dotted path: `--train.lr 1e-4`, `--model.ch_mult [1,2,2]`, or `--train.lr=1e-4`.
Values are parsed as YAML, so numbers, lists and booleans keep their types.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A --section.key override (or config value) the user must fix; the message says how."""


class UnknownSectionError(ConfigError, KeyError):
    """--section.key names a section the config does not have."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


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
    try:
        with open(path) as fh:
            cfg = yaml.load(fh, Loader=_Loader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold sections (data:, model:, ...), not a {type(cfg).__name__}")
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
    """cfg['a']['b'] = value for dotted = 'a.b'; the section must exist. A new key is set too:
    deqlit.runs.sections.resolve then refuses it unless the section takes it."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        if part not in node or not isinstance(node[part], dict):
            sections = [k for k, v in node.items() if isinstance(v, dict)]
            close = difflib.get_close_matches(part, sections, n=1)
            hint = f"; did you mean --{dotted.replace(part, close[0], 1)}?" if close else "."
            raise UnknownSectionError(f"unknown config section {part!r} in --{dotted}{hint} "
                                      f"Sections: {', '.join(sections)}")
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
    """Apply `--a.b value` / `--a.b=value` pairs; any other argument raises ConfigError."""
    cfg = copy.deepcopy(cfg)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unrecognized argument {arg!r}: see --help for the flags; config "
                              f"keys are set as --section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        set_path(cfg, key, typed_value(get_path(cfg, key), parse_value(raw), raw, key))
    return cfg


def typed_value(old: Any, new: Any, raw: str, key: str) -> Any:
    """`new` checked against the type of the config's value `old`; a mismatch raises ConfigError.

    null is always allowed (it unsets an optional value); an int is accepted for a float and a
    whole float (1e3) for an int; a number or boolean typed for a string key keeps its text.
    """
    if old is None or new is None:
        return new
    number = isinstance(new, (int, float)) and not isinstance(new, bool)
    if isinstance(old, bool):
        ok, want = isinstance(new, bool), "true or false"
    elif isinstance(old, int):
        ok, want = number and float(new).is_integer(), "an integer"
        new = int(new) if ok else new
    elif isinstance(old, float):
        ok, want = number, "a number"
        new = float(new) if ok else new
    elif isinstance(old, str):
        ok, want = isinstance(new, (str, int, float, bool)), "a string"
        new = raw.strip() if ok and not isinstance(new, str) else new
    elif isinstance(old, list):
        ok, want = isinstance(new, list), "a list such as [1, 2]"
    elif isinstance(old, dict):
        ok, want = isinstance(new, dict), "a section (set its keys as --section.key value)"
    else:
        ok, want = True, ""
    if not ok:
        raise ConfigError(f"--{key} expects {want} (the config has {old!r}), got {raw!r}")
    return new


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
