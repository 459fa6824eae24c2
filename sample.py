"""Generate images with DEQ-DDIM.

    python sample.py                                   # the shipped faces model, 16 images
    python sample.py --solver picard --timesteps 100 --compare-sequential
    python sample.py --data celeba --ckpt ~/models/celeba/ckpt.pth --eta 0.5
"""
import sys

from deqlit.cli import run_main
from deqlit.commands.sample import main

if __name__ == "__main__":
    run_main(main, sys.argv[1:], script="sample.py", resume_flag=None)
