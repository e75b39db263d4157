#!/usr/bin/env python
"""Controllable generation with orthogonal adapters: a condition encoder added after the UNet's conv_in
(--control_mode encoder, the OFT/BOFT papers' setup) or a ControlNet with adapters (--control_mode controlnet).

Flags follow diffusers' examples/controlnet/train_controlnet.py; run `python train_scripts/train_control.py
--help` (or `diffusion-oft train control --help`).  All logic lives in diffusion_oft.training.control.
"""

import sys

from diffusion_oft.training.control import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as err:  # user errors: one line, exit code 2
        print(f"train_control.py: error: {err}", file=sys.stderr)
        sys.exit(2)
