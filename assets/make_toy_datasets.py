"""Rewrite assets/subject/ (the novel DreamBooth subject), assets/control/ (control triples) and
assets/prior/ (captioned in-world images for the prior-preservation loss) from their seeds.
The logic lives in diffusion_oft/toyworld/datasets.py."""

import shutil
from pathlib import Path

from diffusion_oft.toyworld.datasets import write_control_dataset, write_prior_dataset, write_subject_dataset

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name in ("subject", "control", "prior"):
        shutil.rmtree(here / name, ignore_errors=True)
    print(len(write_subject_dataset(here / "subject")), "subject images in", here / "subject")
    print(write_control_dataset(here / "control"))
    print(len(write_prior_dataset(here / "prior")), "captioned in-world images in", here / "prior")
