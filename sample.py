"""Generate images with DEQ-DDIM.

    python sample.py                                   # the shipped faces model, 16 images
    python sample.py --solver picard --timesteps 100 --compare-sequential --out runs/sample-picard
    python sample.py --data celeba --ckpt ~/models/celeba/ckpt.pth --eta 0.5
    python sample.py --interpolate runs/invert-faces --pairs 0:1,2:3   # into runs/interpolate-faces

A folder that holds an earlier run's outputs is refused: give each run its own --out.
"""
import sys

from deqlit.cli import run_main
from deqlit.commands.sample import main

if __name__ == "__main__":
    run_main(main, sys.argv[1:], script="sample.py")
