"""Generate images with DEQ-DDIM.

    python sample.py                                   # the shipped faces model, 16 images
    python sample.py --solver picard --timesteps 100 --compare-sequential
    python sample.py --data celeba --ckpt ~/models/celeba/ckpt.pth --eta 0.5
"""
import sys

from deqlit.commands.sample import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
