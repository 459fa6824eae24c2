"""Train (or fine-tune) a DDPM noise network with Lightning.

    python train.py --data faces                       # the shipped default model's recipe
    python train.py --data faces --resume              # continue from runs/train-faces/checkpoints/last.ckpt
    python train.py --data celeba --train.lr 2e-5      # any config key can be overridden
    python train.py --task joint --data faces          # fine-tune network + latents of the 16 held-out faces
"""
from __future__ import annotations

import argparse
import sys

from deqlit.cli import ArgumentParser, parse, positive_int, run_main, typed_keys
from deqlit.runs.training import run_training

# --task joint: the shared flags set keys of the joint section (--lr is the network's lr there).
JOINT_FLAGS = {"max_steps": "trainer.max_steps", "lr": "joint.network_lr", "batch_size": "joint.batch_size",
               "seed": "joint.seed", "out": "joint.out"}
# Named flags that one task reads only, with what reads them (given to the other, refused).
TASK_ONLY = {"ckpt": ("joint", "--task joint (the network it fine-tunes; --init starts --task train "
                               "from weights)"),
             "init": ("train", "--task train (the weights it starts from; --ckpt names the network "
                               "--task joint fine-tunes)")}


def refuse_other_tasks_flags(task: str, cfg: dict, args: argparse.Namespace, argv: list[str]) -> None:
    """parse()'s `adjust`: refuse what the command line set that `task` never reads (another
    task's flag or section, another joint.solver's option); the config file's values are
    defaults, never refused."""
    from deqlit.runs.sections import refuse_other_solvers_options, refuse_unread, refuse_unread_adjoint
    flags = {f"--{dest}": reader for dest, (owner, reader) in TASK_ONLY.items()
             if owner != task and getattr(args, dest, None) is not None}
    refuse_unread(task, typed_keys(argv), flags)
    if task == "joint":
        refuse_other_solvers_options(typed_keys(argv), "joint", cfg["joint"]["solver"], "--joint.solver")
        refuse_unread_adjoint(cfg["joint"], typed_keys(argv))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=positive_int, dest="max_steps")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=positive_int, dest="batch_size")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="run folder (logs, checkpoints, ema.pt)")
    parser.add_argument("--init", help="start from these weights (fine-tuning); any format load_weights reads")
    parser.add_argument("--resume", nargs="?", const="last", default=None,
                        help="resume from a Lightning checkpoint (default: the run folder's last.ckpt)")
    parser.add_argument("--fast-dev-run", action="store_true", dest="fast_dev_run")
    parser.add_argument("--task", choices=("train", "joint"), default="train",
                        help="train: the DDPM recipe; joint: fine-tune the network jointly with the "
                             "latents of a set of images through the DEQ (the joint section)")
    parser.add_argument("--ckpt", help="--task joint: the network to fine-tune (default checkpoint.path)")
    # The task picks the flags' keys; read it first without --help (parse prints the full help).
    first = ArgumentParser(add_help=False)
    first.add_argument("--task", default="train")
    task = first.parse_known_args(argv)[0].task
    flags = JOINT_FLAGS if task == "joint" else {
        "max_steps": "train.max_steps", "lr": "train.lr", "batch_size": "data.batch_size",
        "seed": "train.seed", "out": "train.out", "init": "train.init"}
    args, cfg = parse(parser, argv, flags, task=task,
                      adjust=lambda cfg, args, argv: refuse_other_tasks_flags(task, cfg, args, argv))
    if task == "joint":
        from deqlit.runs.joint import run_joint
        run_joint(cfg, resume=args.resume, fast_dev_run=args.fast_dev_run, ckpt=args.ckpt)
        return
    run_training(cfg, resume=args.resume, fast_dev_run=args.fast_dev_run)


if __name__ == "__main__":
    run_main(main, sys.argv[1:], script="train.py")
