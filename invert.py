"""Invert images: find the x_T from which the diffusion model regenerates each of them.

    python invert.py                                    # 16 held-out bundled faces, shipped model
    python invert.py --data celeba                      # the paper's CelebA setting
    python invert.py --method baseline --timesteps 100 --max-steps 200
    python invert.py --task inpaint --mask center       # into runs/invert-faces-inpaint-center
    python invert.py --resume                           # continue an interrupted run

Without --out, the folder is the config's inversion.out (runs/invert-faces) followed by the task,
method and start given: each kind of run gets its own.
"""
import sys

from deqlit.cli import run_main
from deqlit.commands.invert import main

if __name__ == "__main__":
    run_main(main, sys.argv[1:], script="invert.py")
