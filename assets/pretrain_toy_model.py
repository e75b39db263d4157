"""Pretrain the toy-world tiny Stable Diffusion shipped in assets/toy-sd (stage 1 ≈ 45–65 min, stage 2 ≈ 14 min
on 2 CPU cores).

    python assets/pretrain_toy_model.py                # both stages; writes assets/toy-sd/ (seed 0)
    python assets/pretrain_toy_model.py --output_dir /tmp/toy-sd --seed 1
    python assets/pretrain_toy_model.py --output_dir DIR --stage2_only   # stage 2 on a stage-1 folder
    python assets/pretrain_toy_model.py --output_dir DIR --decoder_only --threads 1   # stage 3: VAE decoder only
    python assets/pretrain_toy_model.py --output_dir DIR --vae_channels 16,64,64 --latent_channels 8 \
        --vae_data codec --vae_logvar_init -6 --vae_gradient_weight 1 --vae_lr 2e-3 --vae_batch_size 24
                                                       # a wider autoencoder with an 8-channel latent

The logic lives in diffusion_oft/toyworld/pretrain.py.
"""

import sys

from diffusion_oft.toyworld.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
