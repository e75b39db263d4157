#!/usr/bin/env python
"""DreamBooth-style subject training with an orthogonal adapter (OFT, BOFT, ETHER, ETHER+, HRA).

Flags follow diffusers' examples/dreambooth scripts; run `python train_scripts/train_dreambooth.py --help`
(or `diffusion-oft train dreambooth --help`).  Works under `accelerate launch` with several processes.
All logic lives in diffusion_oft.training.dreambooth.
"""

import sys

from diffusion_oft.toyworld.evaluate import judge_adapter
from diffusion_oft.training.dreambooth import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:], judge=judge_adapter)  # --judge toyworld
    except ValueError as err:  # user errors: one line, exit code 2
        print(f"train_dreambooth.py: error: {err}", file=sys.stderr)
        sys.exit(2)
