"""Reliability: training killed with SIGKILL (between checkpoints, or while one is written) resumes
to the bit-identical adapter; torn checkpoint folders are detected and skipped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import make_subject_images

from diffusion_oft.tiny import save_tiny_sd
from diffusion_oft.training.checkpoints import checkpoint_problem, list_checkpoints, resolve_checkpoint
from diffusion_oft.training.dreambooth import main as train_main

pytestmark = pytest.mark.slow  # interruption

REPO = Path(__file__).resolve().parents[1]

# Runs the DreamBooth trainer and SIGKILLs its own process at a chosen point (no cleanup runs).
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from diffusion_oft.training.dreambooth import DreamBoothTrainer, main
where, step = sys.argv[1], int(sys.argv[2])
if where == "between":  # in the forward pass of the step after checkpoint `step`
    original = DreamBoothTrainer.compute_loss
    def compute_loss(self, batch, generator):
        if self.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch, generator)
    DreamBoothTrainer.compute_loss = compute_loss
else:  # while checkpoint `step` is being written: after the adapter file, before the optimizer state
    original = DreamBoothTrainer.save_training_state
    def save_training_state(self, directory):
        if self.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, directory)
    DreamBoothTrainer.save_training_state = save_training_state
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    model = save_tiny_sd(root / "tiny-sd")
    data = make_subject_images(root / "subject", n=3)
    script = root / "killer.py"
    script.write_text(KILLER)

    def argv(out: Path, *extra: str) -> list[str]:
        return [
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
            "--report_to",
            "none",
            "--max_train_steps",
            "8",
            "--checkpointing_steps",
            "2",
            "--checkpoints_total_limit",
            "2",
            "--seed",
            "11",
            "--learning_rate",
            "1e-2",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            "2",
            *extra,
        ]

    reference = root / "reference"
    train_main(argv(reference))
    return root, script, argv, load_file(str(reference / "adapter.safetensors"))


def run_killed(script: Path, where: str, step: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(script), where, str(step), *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def assert_same_adapter(path: Path, reference: dict[str, torch.Tensor]) -> None:
    result = load_file(str(path))
    assert set(result) == set(reference)
    assert all(torch.equal(result[k], reference[k]) for k in reference)


def test_sigkill_between_checkpoints_resumes_bit_exact(setup, capsys):
    root, script, argv, reference = setup
    out = root / "killed-between"
    run_killed(script, "between", 5, argv(out))  # killed during step 6, after checkpoint-4
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter.safetensors").exists()
    result = train_main(argv(out, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in capsys.readouterr().out and result["global_step"] == 8
    assert_same_adapter(out / "adapter.safetensors", reference)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(setup, capsys):
    root, script, argv, reference = setup
    out = root / "killed-writing"
    run_killed(script, "writing", 6, argv(out))  # killed while checkpoint-6 is written
    # the torn write is only in a temporary folder; checkpoint-4 (and -2) are intact
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert (out / ".tmp-checkpoint-6").is_dir()
    assert checkpoint_problem(out / ".tmp-checkpoint-6") is not None
    assert resolve_checkpoint(out, "latest").name == "checkpoint-4"
    train_main(argv(out, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in capsys.readouterr().out
    assert_same_adapter(out / "adapter.safetensors", reference)
    assert not (out / ".tmp-checkpoint-6").exists()  # rewritten and renamed by the resumed run


def complete_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"x": torch.zeros(4)}, str(folder / "adapter.safetensors"))
    for name in ("optimizer.safetensors", "training_state.json"):
        (folder / name).write_bytes(b"state")
    return folder


def test_torn_checkpoints_are_detected_and_skipped(tmp_path, capsys):
    complete_checkpoint(tmp_path / "checkpoint-2")
    torn = {
        "checkpoint-4": lambda p: (p / "optimizer.safetensors").unlink(),  # the optimizer state missing
        "checkpoint-6": lambda p: (p / "adapter.safetensors").write_bytes(
            (p / "adapter.safetensors").read_bytes()[:-3]
        ),  # truncated adapter
        "checkpoint-8": lambda p: (p / "training_state.json").write_bytes(b""),  # zero-byte file
        "checkpoint-10": lambda p: (p / "adapter.safetensors").write_bytes(b"garbage!" * 4),  # bad header
    }
    for name, damage in torn.items():
        damage(complete_checkpoint(tmp_path / name))
        assert checkpoint_problem(tmp_path / name) is not None
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    printed = capsys.readouterr().out
    for name in torn:
        assert f"skipping incomplete checkpoint {tmp_path / name}" in printed
    with pytest.raises(ValueError, match="incomplete or torn"):
        resolve_checkpoint(tmp_path, "checkpoint-6")
    # nothing complete at all: a fresh run (None), with the messages
    (tmp_path / "checkpoint-2" / "optimizer.safetensors").unlink()
    assert resolve_checkpoint(tmp_path, "latest") is None


# A pickle that writes a file when it is unpickled (what a checkpoint folder from elsewhere could hold).
HOSTILE = """
import pickle, sys
class Boom:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
with open(sys.argv[1], "wb") as f:
    pickle.dump(Boom(), f)
"""


def test_resuming_never_unpickles(setup, capsys):
    """Checkpoints hold no pickles (optimizer tensors as safetensors, the rest JSON); pickles placed in a
    checkpoint folder are never run, and an old-format folder is read with torch's weights-only loader."""
    root, script, argv, reference = setup
    out = root / "hostile"
    run_killed(script, "between", 5, argv(out))  # checkpoint-2 and checkpoint-4 on disk
    checkpoint = out / "checkpoint-4"
    assert not list(checkpoint.rglob("*.pkl")) and not list(checkpoint.rglob("*.bin"))
    assert {p.name for p in checkpoint.iterdir()} >= {
        "adapter.safetensors",
        "optimizer.safetensors",
        "training_state.json",
    }
    legacy_out = root / "hostile-legacy"
    shutil.copytree(out / "checkpoint-2", legacy_out / "checkpoint-2")
    hostile = root / "hostile.py"
    hostile.write_text(HOSTILE)
    marker = root / "pwned"
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "scaler.pt"):
        subprocess.run([sys.executable, str(hostile), str(checkpoint / name), str(marker)], check=True)
    result = train_main(argv(out, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in capsys.readouterr().out and result["global_step"] == 8
    assert not marker.exists()  # none of the pickles ran
    assert_same_adapter(out / "adapter.safetensors", reference)  # and the resume is still bit-exact
    # an old-format folder (accelerate's pickles, no training_state.json): weights-only loading refuses
    # the hostile optimizer.bin with one line and runs nothing
    legacy = legacy_out / "checkpoint-2"
    (legacy / "training_state.json").unlink()
    (legacy / "optimizer.safetensors").unlink()
    subprocess.run([sys.executable, str(hostile), str(legacy / "optimizer.bin"), str(marker)], check=True)
    with pytest.raises(ValueError, match="refused"):
        train_main(argv(legacy_out, "--resume_from_checkpoint", "latest"))
    assert not marker.exists()
