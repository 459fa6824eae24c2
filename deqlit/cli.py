"""Shared command-line handling of the entry scripts: --data/--config plus dotted overrides, and
`run_main`, which turns expected user errors into one line on stderr (traceback with --debug)."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any, NoReturn

import yaml

from deqlit.config import apply_overrides, find_config, load_config, set_path


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, `error: ... (see --help)` with exit code 2,
    as run_main's: the usage block argparse prints first buries the line that says what to fix."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def typed_keys(argv: list[str], expand_mappings: bool = False) -> dict[str, str]:
    """{dotted config key: the word that set it} for each `--section.key[.sub] value` (or
    `--section.key=value`) of a command line; what comes from a config file is not in it.
    expand_mappings: a value typed as a mapping (`--inversion.exact '{init: ddim}'`) also sets its
    keys ('inversion.exact.init', set by the word "init in --inversion.exact"), as the dotted
    form of each would."""
    typed = {}
    for i, word in enumerate(argv):
        match = re.match(r"--([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:=|$)", word)
        if not match:
            continue
        flag = word.split("=", 1)[0]
        typed.setdefault(match.group(1), flag)
        value = word.split("=", 1)[1] if "=" in word else (argv[i + 1] if i + 1 < len(argv) else "")
        if expand_mappings and value.lstrip().startswith("{"):
            try:
                mapping = yaml.safe_load(value)
            except yaml.YAMLError:          # the override itself reports a malformed value
                mapping = None
            for sub in mapping if isinstance(mapping, dict) else ():
                typed.setdefault(f"{match.group(1)}.{sub}", f"{sub} in {flag}")
    return typed


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, flag_to_key: dict[str, str],
          default_data: str = "faces", task: str | None = None,
          adjust: Any = None) -> tuple[argparse.Namespace, dict]:
    """Parse named flags, load the config, apply `--section.key value` overrides, and resolve it.

    `flag_to_key` maps an argparse dest (e.g. 'lr') to its config key (e.g. 'inversion.lr'); a flag
    left at None does not override the YAML. `task` picks the job's Trainer defaults
    (deqlit.runs.sections.TASK_TRAINER). `adjust(cfg, args, argv)`, a command's own defaults that
    depend on what was passed (invert.py's restoration tasks), runs before --print_config, which
    prints the resolved config and exits 0; its returned line (or None) is args.note. The scripts
    pass this module's ArgumentParser: a bad flag value is one line, `error: ... (see --help)`.
    Returns (args, resolved config).
    """
    from deqlit.runs.sections import print_config, resolve
    parser.add_argument("--data", default=None,
                        help="dataset name: faces, digits, cifar10, celeba, lsun-bedroom, "
                             "lsun-church, folder:PATH (default: faces)")
    parser.add_argument("--config", default=None, help="YAML config (default: configs/<data>.yaml); "
                        "RUN/config.yaml replays a run")
    parser.add_argument("--print_config", "--print-config", action="store_true", dest="print_config",
                        help="print the resolved config (YAML that --config reads) and exit")
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true",
                            help="show the traceback of an error (also DEQLIT_DEBUG=1)")
    parser.epilog = ((parser.epilog or "") + "\nAny config key can be set as --section.key value "
                     "(e.g. --trainer.precision 64-true); see --print_config for every key.").strip()
    args, rest = parser.parse_known_args(argv)
    data = args.data or default_data
    # A folder of images goes with the shipped faces model unless --config names another one.
    config_name = "faces" if data.startswith("folder:") else data
    cfg = resolve(load_config(args.config if args.config else find_config(config_name)), task)
    named = cfg["data"]["name"]
    if args.data and args.config and not args.data.startswith("folder:") and named != args.data:
        # A folder goes with any config's model; another set would silently use the wrong model.
        raise ValueError(f"--data {args.data} contradicts --config {args.config}, whose data.name "
                         f"is {named!r}: drop --config to use configs/{args.data}.yaml, or drop "
                         f"--data to use {named!r}")
    if args.data and args.data.startswith("folder:"):
        set_path(cfg, "data.name", args.data)
    cfg = apply_overrides(cfg, rest)
    for dest, key in flag_to_key.items():
        value: Any = getattr(args, dest, None)
        if value is not None:
            set_path(cfg, key, value)
    cfg = resolve(cfg, task)
    args.note = adjust(cfg, args, list(argv or [])) if adjust is not None else None
    if args.print_config:
        print(print_config(cfg), end="")
        raise SystemExit(0)
    return args, cfg


# ---- argument types and the error wrapper of the entry scripts ---------------------------------
def int_at_least(minimum: int, rule: str) -> Callable[[str], int]:
    """argparse type: an integer >= minimum; `rule` says why, in the error (e.g. 'must be 2 or more')."""
    def parse_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{rule}; got {text!r}, not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value
    return parse_int


# A zero or negative count would divide by zero or do nothing.
positive_int = int_at_least(1, "must be a positive integer (1 or more)")


def describe_error(err: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an error the user can fix or must know of; None for a bug.

    Exit code 2 for bad input (as argparse), 1 for a run that failed (divergence, full disk).
    """
    from deqlit.config import ConfigError
    from deqlit.deq.solvers import SolverDivergedError
    from deqlit.guards import NonFiniteError, RankZeroStopped, UserInputError, find_enospc

    full = find_enospc(err)
    if full is not None:
        if full.filename and "no space left" in str(full):
            return str(full), 1
        return f"no space left on device while writing {_full_file(full)}; free space or choose another --out", 1
    from deqlit.deq.inversion_report import InversionNotConverged
    from deqlit.parallel.launch import describe_lost_peer
    lost = describe_lost_peer(err)          # another process of a multi-process run went silent
    if lost is not None:
        return lost, 1
    if isinstance(err, (NonFiniteError, SolverDivergedError, InversionNotConverged, RankZeroStopped)):
        return str(err), 1
    if isinstance(err, (ConfigError, UserInputError)):
        return str(err), 2
    if isinstance(err, PermissionError):
        where = f" {err.filename}" if err.filename else ""
        return f"permission denied{where}: choose another --out or fix the permissions ({err})", 2
    if isinstance(err, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                        ValueError)):
        return str(err), 2
    if isinstance(err, RuntimeError) and re.search(r"PytorchStreamWriter failed|unexpected pos", str(err)):
        return (f"writing a file failed ({str(err).splitlines()[0][:120]}): the disk may be full "
                "or the output folder unwritable"), 1
    return None


def _full_file(err: OSError) -> str:
    """The file a full disk refused: a move's destination (filename2), the file named, or where
    the traceback says it was (TensorBoard's writer thread names none)."""
    if err.filename2 or err.filename:
        return str(err.filename2 or err.filename)
    tb = err.__traceback__
    while tb is not None:
        if "tensorboard" in tb.tb_frame.f_code.co_filename:
            return "TensorBoard's event file (RUN/tb/)"
        tb = tb.tb_next
    return "a file under the output folder"


def script_as_typed(script: str) -> str:
    """The script as the user started it (`python /work/main/sample.py` from elsewhere: that path,
    so that the printed command runs where they are), else its bare name."""
    typed = sys.argv[0] if sys.argv else ""
    return typed if Path(typed).name == script else script


def resume_command(script: str, argv: list[str], resume_flag: str = "--resume") -> str:
    """The command line that continues this run: the same arguments, plus --resume if absent."""
    has = any(a == resume_flag or a.startswith(resume_flag + "=") for a in argv)
    return shlex.join(["python", script, *argv, *([] if has else [resume_flag])])


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None, *, script: str,
             resume_flag: str | None = "--resume") -> None:
    """Run an entry script's main(argv), printing expected errors as `error: ...` and exiting.

    --debug (removed from argv) or DEQLIT_DEBUG=1 re-raises instead, with the traceback.
    RunInterrupted (guards.interrupts_as_exceptions) prints what was saved and the --resume
    command, and exits 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
    """
    from deqlit.guards import RunInterrupted, find_enospc
    from deqlit.runs.guards import quiet_lightning_tips

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DEQLIT_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    quiet_lightning_tips()
    thread_errors: list[BaseException] = []
    previous_hook = threading.excepthook

    def quiet_full_disk(args: Any) -> None:
        # A full disk in a writer thread (TensorBoard's): one error line, not a thread's traceback.
        if not debug and args.exc_value is not None and find_enospc(args.exc_value) is not None:
            thread_errors.append(args.exc_value)
            return
        previous_hook(args)
    threading.excepthook = quiet_full_disk
    try:
        main(argv)
        if thread_errors:        # the run itself went on: the thread's error is the one to report
            raise thread_errors[0]
    except RunInterrupted as err:
        from deqlit.runs.launch import process_rank
        if process_rank() > 0:       # rank 0 prints the resume command, once, as the user typed it
            print(f"{script} (process {process_rank()}): {err}", file=sys.stderr)
            sys.exit(128 + err.signum)
        print(f"{script}: {err}", file=sys.stderr)
        if resume_flag and err.resumable:
            print(f"resume with: {resume_command(script_as_typed(script), argv, resume_flag)}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{script}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as err:
        described = None if debug else describe_error(err)
        if described is None:
            raise
        message, code = described
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)
    finally:
        threading.excepthook = previous_hook
