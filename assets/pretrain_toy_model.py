"""Pretrain the toy-world tiny Stable Diffusion shipped in assets/toy-sd (≈ 45 min on 2 CPU cores).

    python assets/pretrain_toy_model.py                # writes assets/toy-sd/ (seed 0)
    python assets/pretrain_toy_model.py --output_dir /tmp/toy-sd --seed 1

The logic lives in diffusion_oft/toyworld/pretrain.py.
"""

import sys

from diffusion_oft.toyworld.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
