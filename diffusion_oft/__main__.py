"""`python -m diffusion_oft ...` is the `diffusion-oft` command."""

import sys

from diffusion_oft.cli import main

sys.exit(main())
