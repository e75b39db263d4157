"""The whole DreamBooth training job, ours against diffusers' ``examples/dreambooth/train_dreambooth_lora.py``.

Both scripts are run as separate processes on the same data, settings and learning rate, alternating
round by round (the machine is noisy and shared: medians over rounds are reported).  Measured per run:
the whole process (spawn to exit, start-up and writing included) and the mean step (from the step
progress bar's updates, first step excluded: each script's own loop around the model).

Cases:
- ``toy``: the toy model (assets/toy-sd), 100 steps of batch 4 at 64 px, the five subject photos
  (without their captions, so both train on the instance prompt), lr 1e-3; ours OFT b=32, theirs LoRA r=4;
- ``sd15``: SD 1.5's architecture with random weights (saved once as a local folder), 256 px, batch 1,
  20 steps.

The reference script is not part of this repository: pass its path with ``--reference`` (take it from
the diffusers repository at the version you run); that side is skipped with a message when absent.
Its ``torchvision`` import needs torchvision; with a CPU-only torch whose matching torchvision is not
installed, ``--torchvision_standin DIR`` names a folder (outside this repository) holding a stand-in
``torchvision`` package with the few transforms the script uses.

    python benchmarks/train_e2e.py --reference /path/to/train_dreambooth_lora.py --rounds 3 --cases toy sd15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a sks toy on a white background"


# ---- the timed child: records the step bar's updates, then runs the script --------------------------------
def timed_child(out: str, standin: str | None, target: list[str]) -> None:
    import atexit
    import runpy

    t_start = time.perf_counter()
    bars: dict[int, dict] = {}
    from tqdm import std

    original = std.tqdm.update

    def update(self, n=1):
        empty = {"desc": getattr(self, "desc", ""), "total": getattr(self, "total", None), "times": []}
        rec = bars.setdefault(id(self), empty)
        rec["times"].append(time.perf_counter())
        return original(self, n)

    std.tqdm.update = update
    atexit.register(
        lambda: Path(out).write_text(
            json.dumps({"start": t_start, "exit": time.perf_counter(), "bars": list(bars.values())})
        )
    )
    if standin:  # transformers probes torchvision when it loads: load it first, then the stand-in
        import importlib.util

        import peft  # noqa: F401
        import transformers  # noqa: F401

        spec = importlib.util.spec_from_file_location(
            "torchvision", Path(standin) / "torchvision" / "__init__.py",
            submodule_search_locations=[str(Path(standin) / "torchvision")],
        )  # fmt: skip
        module = importlib.util.module_from_spec(spec)
        sys.modules["torchvision"] = module
        spec.loader.exec_module(module)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


# ---- the parent -------------------------------------------------------------------------------------------
def make_sd15(folder: Path) -> Path:
    """SD 1.5's architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights, saved once."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD 1.5's UNet
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(REPO / "assets/toy-sd/tokenizer"), model_max_length=77)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_data(folder: Path, resolution: int) -> Path:
    """The subject photos without their caption files, resized to the resolution."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((REPO / "assets/subject").glob("*.png")):
        Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC).save(folder / path.name)
    return folder


def commands(case: dict, model: Path, data: Path, out: Path, reference: Path | None) -> dict[str, list[str]]:
    common = [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data), "--instance_prompt", PROMPT,
        "--resolution", str(case["resolution"]), "--train_batch_size", str(case["batch"]),
        "--learning_rate", str(case["lr"]), "--max_train_steps", str(case["steps"]), "--seed", "0",
        "--checkpointing_steps", "100000",
    ]  # fmt: skip
    # neither renders sample images: diffusers' script does so only with --validation_prompt
    cmds = {
        "ours": [
            "-m",
            "diffusion_oft",
            "train",
            "dreambooth",
            *common,
            "--block_size",
            "32",
            "--report_to",
            "none",
            "--num_validation_images",
            "0",
            "--output_dir",
            str(out / "ours"),
        ]
    }
    if reference is not None:
        cmds["diffusers"] = [str(reference), *common, "--rank", "4", "--output_dir", str(out / "diffusers")]
    return cmds


def run_once(name: str, cmd: list[str], standin: str | None, work: Path, threads: int, steps: int) -> dict:
    record = work / f"{name}-bars.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "_timed", str(record)]
    if standin and name == "diffusers":
        argv += ["--torchvision_standin", standin]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run([*argv, "--", *cmd], cwd=str(work), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rec = json.loads(record.read_text())
    loop = [b for b in rec["bars"] if b["total"] == steps and len(b["times"]) >= steps] or rec["bars"]
    t = max(loop, key=lambda b: len(b["times"]))["times"]  # the training loop's bar
    # before: imports, loading, set-up and the first step; after: saving, final samples, exit
    return {
        "wall_s": wall,
        "step_s": (t[-1] - t[0]) / (len(t) - 1),
        "steps": len(t),
        "before_s": t[0] - rec["start"],
        "after_s": rec["exit"] - t[-1],
    }


CASES = {
    "toy": {"model": "toy", "resolution": 64, "batch": 4, "steps": 100, "lr": 1e-3},
    "sd15": {"model": "sd15", "resolution": 256, "batch": 1, "steps": 20, "lr": 1e-4},
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--reference", type=Path, default=None, help="diffusers' examples/dreambooth/train_dreambooth_lora.py"
    )
    p.add_argument("--torchvision_standin", default=None, help="folder holding a stand-in torchvision package")
    p.add_argument("--cases", nargs="+", default=["toy"], choices=sorted(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work_dir", type=Path, default=None, help="where models/data/outputs go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    args = p.parse_args(argv)
    reference = args.reference
    if reference is not None and not reference.is_file():
        print(f"reference script {reference} not found: measuring ours only")
        reference = None
    elif reference is None:
        print("no --reference given: measuring ours only (pass diffusers' train_dreambooth_lora.py to compare)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="train_e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[dict]]] = {}
    for case_name in args.cases:
        case = CASES[case_name]
        model = REPO / "assets/toy-sd" if case["model"] == "toy" else make_sd15(work / "sd15-random")
        data = make_data(work / f"data-{case['resolution']}", case["resolution"])
        results[case_name] = {}
        for r in range(args.rounds):
            out = work / f"out-{case_name}"
            cmds = commands(case, model, data, out, reference)
            order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]  # alternate who goes first
            for name in order:
                shutil.rmtree(out / name, ignore_errors=True)
                fig = run_once(name, cmds[name], args.torchvision_standin, work, args.threads, case["steps"])
                results[case_name].setdefault(name, []).append(fig)
                print(
                    f"{case_name} round {r + 1} {name}: whole {fig['wall_s']:.2f} s, "
                    f"step {fig['step_s'] * 1e3:.1f} ms (up to the first step {fig['before_s']:.2f} s, "
                    f"after the last {fig['after_s']:.2f} s)",
                    flush=True,
                )
    print()
    print("| case | script | whole process (s, median) | step (ms, median) | whole / diffusers | step / diffusers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case_name, sides in results.items():
        med = {
            n: (statistics.median(f["wall_s"] for f in fs), statistics.median(f["step_s"] for f in fs))
            for n, fs in sides.items()
        }
        for name, (wall, step) in med.items():
            ratio = ("", "")
            if "diffusers" in med:
                ratio = (f"{wall / med['diffusers'][0]:.2f}", f"{step / med['diffusers'][1]:.2f}")
            print(f"| {case_name} | {name} | {wall:.2f} | {step * 1e3:.1f} | {ratio[0]} | {ratio[1]} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_timed":
        rest = sys.argv[3:]
        standin = None
        if rest and rest[0] == "--torchvision_standin":
            standin, rest = rest[1], rest[2:]
        timed_child(sys.argv[2], standin, rest[1:] if rest and rest[0] == "--" else rest)
    else:
        main()
