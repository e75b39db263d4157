"""Training: data, loss, the accelerate loop, checkpoints, validation grids and model cards shared by
``train_scripts/train_dreambooth.py`` and ``train_scripts/train_control.py`` (and ``diffusion-oft train``).

Imports are lazy: ``from diffusion_oft.training import dreambooth`` pulls in only what it needs.
"""
