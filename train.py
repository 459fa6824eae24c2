"""Train (or fine-tune) a DDPM noise network with Lightning.

    python train.py --data faces                       # the shipped default model's recipe
    python train.py --data faces --resume              # continue from runs/train-faces/checkpoints/last.ckpt
    python train.py --data celeba --train.lr 2e-5      # any config key can be overridden
"""
from __future__ import annotations

import argparse
import sys

from deqlit.cli import parse, positive_int, run_main
from deqlit.lit.run_training import run_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=positive_int, dest="max_steps")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=positive_int, dest="batch_size")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="run folder (logs, checkpoints, ema.pt)")
    parser.add_argument("--init", help="start from these weights (fine-tuning); any format load_weights reads")
    parser.add_argument("--resume", nargs="?", const="last", default=None,
                        help="resume from a Lightning checkpoint (default: the run folder's last.ckpt)")
    parser.add_argument("--fast-dev-run", action="store_true", dest="fast_dev_run")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also DEQLIT_DEBUG=1)")
    args, cfg = parse(parser, argv, {"max_steps": "train.max_steps", "lr": "train.lr",
                                     "batch_size": "data.batch_size", "seed": "train.seed",
                                     "out": "train.out", "init": "train.init"})
    run_training(cfg, resume=args.resume, fast_dev_run=args.fast_dev_run)


if __name__ == "__main__":
    run_main(main, sys.argv[1:], script="train.py")
