"""DreamBooth training under `accelerate launch` with two CPU processes (DDP over gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from training_helpers import make_subject_images, read_tensors

from diffusion_oft.tiny import save_tiny_sd

pytestmark = pytest.mark.slow  # DDP

RANK_SCRIPT = """
import sys
from pathlib import Path
from safetensors.torch import save_file
from diffusion_oft.files import adapter_state_dict
from diffusion_oft.training.args import dreambooth_parser, finalize_args
from diffusion_oft.training.dreambooth import DreamBoothTrainer

dump = Path(sys.argv[1])
args = finalize_args(dreambooth_parser().parse_args(sys.argv[2:]), "dreambooth")
trainer = DreamBoothTrainer(args)
trainer.run()
rank = trainer.accelerator.process_index
save_file(adapter_state_dict(trainer.base.unet), str(dump / f"rank{rank}.safetensors"))
(dump / f"rank{rank}.info").write_text(f"{trainer.accelerator.num_processes} {trainer.accelerator.distributed_type}")
"""


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_cpu_processes_end_with_the_same_adapter(tmp_path):
    model = save_tiny_sd(tmp_path / "tiny-sd")
    data = make_subject_images(tmp_path / "subject", n=4)
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "run_rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(Path.cwd()))
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(dump),
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        "a photo of sks disc",
        "--output_dir",
        str(out),
        "--resolution",
        "16",
        "--max_train_steps",
        "6",
        "--learning_rate",
        "1e-2",
        "--checkpointing_steps",
        "3",
        "--num_inference_steps",
        "2",
        "--num_validation_images",
        "1",
        "--report_to",
        "none",
        "--gradient_accumulation_steps",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (dump / "rank0.info").read_text() == (dump / "rank1.info").read_text() == "2 DistributedType.MULTI_CPU"
    rank0, rank1 = read_tensors(dump / "rank0.safetensors"), read_tensors(dump / "rank1.safetensors")
    assert any(v.abs().sum() > 0 for v in rank0.values()), "the adapter trained"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = read_tensors(out / "adapter.safetensors")
    for key, value in rank0.items():
        assert torch.equal(saved["unet." + key], value)
    # Only rank 0 wrote: one set of checkpoint files, no random state of rank 1.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list(out.rglob("*.pkl"))  # no pickles at all (and only the main process writes)
    assert proc.stdout.count("saved " + str(out / "adapter.safetensors")) == 1
