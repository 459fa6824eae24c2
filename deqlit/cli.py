"""Shared command-line handling of the entry scripts: --data/--config plus dotted overrides."""
from __future__ import annotations

import argparse
from typing import Any

from deqlit.config import apply_overrides, find_config, load_config, set_path


def parse(parser: argparse.ArgumentParser, argv: list[str] | None,
          flag_to_key: dict[str, str], default_data: str = "faces") -> tuple[argparse.Namespace, dict]:
    """Parse named flags, load the config, then apply `--section.key value` overrides.

    `flag_to_key` maps an argparse dest (e.g. 'lr') to its config key (e.g. 'inversion.lr'); a flag
    left at None does not override the YAML. Returns (args, resolved config).
    """
    parser.add_argument("--data", default=None,
                        help="dataset name: faces, digits, cifar10, celeba, lsun-bedroom, "
                             "lsun-church, folder:PATH (default: faces)")
    parser.add_argument("--config", default=None, help="YAML config (default: configs/<data>.yaml)")
    args, rest = parser.parse_known_args(argv)
    data = args.data or default_data
    # A folder of images goes with the shipped faces model unless --config names another one.
    config_name = "faces" if data.startswith("folder:") else data
    cfg = load_config(args.config if args.config else find_config(config_name))
    if args.data and args.data.startswith("folder:"):
        set_path(cfg, "data.name", args.data)
    cfg = apply_overrides(cfg, rest)
    for dest, key in flag_to_key.items():
        value: Any = getattr(args, dest, None)
        if value is not None:
            set_path(cfg, key, value)
    return args, cfg
