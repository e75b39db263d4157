"""`diffusion-oft generate`: images from a base model plus one or more adapter files.

    diffusion-oft generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter subject.safetensors --adapter style.safetensors --adapter_scale 1.0 0.6 \\
        --prompt "a photo of sks dog" --num_images 4 --seed 0 --output_dir out

writes ``out/000-seed0.png`` ... one PNG per image (a progress bar each), ``out/grid.png`` and
``out/generation.json`` (every setting and seed, to reproduce an image), and prints their paths.
Inputs are checked before the model is loaded; a wrong one is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import types
from pathlib import Path

from ..files import one_line
from . import CommandError

# Short names for common schedulers; any diffusers scheduler class name is accepted too.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
DTYPES = ("auto", "fp32", "fp16", "bf16")


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse errors of this command as one line (no usage block), exit code 2."""
    print(f"diffusion-oft generate: error: {message} (see diffusion-oft generate --help)", file=sys.stderr)
    sys.exit(2)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images with one or more adapters (PNGs + a grid)",
        description="Generate images from a diffusers model with diffusion-oft adapters loaded.",
    )
    p.error = types.MethodType(_one_line_error, p)
    p.add_argument(
        "--model",
        required=True,
        help="hub id or local folder of a diffusers pipeline (SD 1.x/2.x, SDXL, SD3, Flux), or a built-in tiny "
        "model (offline): builtin:tiny-sd, -sdxl, -sd3, -flux, -flux-schnell",
    )
    p.add_argument(
        "--adapter", action="append", default=[], metavar="FILE", help="adapter .safetensors (repeat to compose)"
    )
    p.add_argument(
        "--adapter_scale",
        type=float,
        nargs="+",
        default=None,
        metavar="S",
        help="one scale for all adapters or one per --adapter (0 = base model, 1 = as trained)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance (FLUX.1-dev: its guidance embedding); default: the pipeline's "
        "own (SD 7.5, SD3 7.0, Flux 3.5)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first image (image i uses seed + i; default 0; -1: a random seed, printed)",
    )
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument(
        "--scheduler",
        default=None,
        help=f"one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name (default: the model's own)",
    )
    p.add_argument("--output_dir", default="diffusion-oft-images")
    p.add_argument("--merge", action="store_true", help="merge the adapters into the weights (base-model speed)")
    p.add_argument(
        "--control_image",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="condition image(s) for an --adapter trained by `diffusion-oft train control` (its "
        "condition_encoder.safetensors next to it); one for all images or one per image, resized to --height/--width",
    )
    p.add_argument(
        "--control_scale", type=float, default=None, help="strength of the condition (0 = none; default 1.0)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps ...")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: fp16 on cuda, fp32 elsewhere")
    p.add_argument("--cpu_offload", action="store_true", help="enable_model_cpu_offload (needs a GPU and accelerate)")
    p.set_defaults(func=run)


# ---- checks that need no model ------------------------------------------------------------------


def check_args(args) -> None:
    """Every check that can run before the model is loaded (raises ValueError, one line)."""

    if not args.prompt.strip():
        raise CommandError("--prompt is empty")
    for name in ("num_images", "steps"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise CommandError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise CommandError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.adapter_scale is not None and len(args.adapter_scale) not in (1, len(args.adapter)):
        raise CommandError(
            f"--adapter_scale takes one value or one per --adapter ({len(args.adapter)}), got {len(args.adapter_scale)}"
        )
    if args.adapter_scale is not None and not args.adapter:
        raise CommandError("--adapter_scale was given without --adapter")
    if args.merge and not args.adapter:
        raise CommandError("--merge was given without --adapter")
    if args.scheduler is not None:
        scheduler_class(args.scheduler)
    if args.control_image:
        for image in args.control_image:
            if not Path(image).is_file():
                raise CommandError(f"--control_image {image}: no such file")
        if len(args.control_image) not in (1, args.num_images):
            raise CommandError(
                f"--control_image takes one image or one per image ({args.num_images}), got {len(args.control_image)}"
            )
    elif args.control_scale is not None:
        raise CommandError("--control_scale was given without --control_image")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--output_dir {out} exists and is not a folder")
    from ..model_paths import resolve_model_path

    # builtin:tiny-sd (no download); a path-like value that does not exist fails here, not after hub retries
    args.model_path = resolve_model_path(args.model, "--model")
    model = Path(args.model_path).expanduser()
    if model.exists():
        if not model.is_dir():
            raise CommandError(
                f"--model {args.model} is a file; give a diffusers model folder (with model_index.json) or a hub id"
            )
        if not (model / "model_index.json").is_file():
            raise CommandError(f"--model {args.model}: no model_index.json in this folder (not a diffusers pipeline)")
    if args.device != "auto":
        import torch

        try:
            torch.device(args.device)
        except RuntimeError:
            raise CommandError(f"--device {args.device!r} is not a torch device") from None
    from ..files import read_adapter_file

    for path in args.adapter:
        if not Path(path).exists():
            raise CommandError(f"--adapter {path}: no such file")
        if not Path(path).is_dir():  # a PEFT folder is read (and converted) by load_adapter
            read_adapter_file(path)  # readable safetensors, never a pickle (AdapterFileError is a ValueError)
    args.control_adapter = None
    if args.control_image:
        from ..control import is_control_adapter

        paired = [path for path in args.adapter if is_control_adapter(path)]
        if len(paired) != 1:
            raise CommandError(
                "--control_image needs exactly one --adapter trained by `diffusion-oft train control` "
                f"(with its condition_encoder.safetensors), got {len(paired)}"
            )
        args.control_adapter = paired[0]


def scheduler_class(name: str):
    """(diffusers scheduler class, extra config) for a short name or a class name."""
    import diffusers

    class_name, extra = SCHEDULERS.get(name.lower(), (name, {}))
    cls = getattr(diffusers, class_name, None) if class_name.endswith("Scheduler") else None
    if cls is None:
        raise CommandError(f"unknown --scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a class name")
    return cls, extra


# ---- the pipeline -------------------------------------------------------------------------------


def resolve_device_and_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp16" if torch.device(device).type == "cuda" else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def load_pipeline(args, dtype):
    """The text-to-image pipeline of --model (the controllable one when --control_image is given)."""

    if args.control_image:
        return load_control_pipeline(args, dtype)
    from diffusers import AutoPipelineForText2Image

    try:
        return AutoPipelineForText2Image.from_pretrained(args.model_path, **dtype_kwarg(dtype))
    except Exception as err:  # hub, config and class errors of many kinds
        reason = one_line(err, first=True)
        raise CommandError(f"could not load --model {args.model}: {reason}") from None


def dtype_kwarg(dtype) -> dict:
    """``dtype=`` for diffusers versions that deprecate ``torch_dtype=``, else ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_control_pipeline(args, dtype):
    """The controllable pipeline of --model with the condition encoder paired with ``args.control_adapter``
    (the adapters themselves, that one included, are loaded by ``run`` like any others)."""
    from ..control import load_paired_encoder
    from ..pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    try:
        pipe = OrthoStableDiffusionControlPipeline.from_pretrained(args.model_path, **dtype_kwarg(dtype))
    except Exception as err:  # hub, config and class errors of many kinds
        reason = one_line(err, first=True)
        raise CommandError(f"could not load --model {args.model} as a controllable pipeline: {reason}") from None
    try:
        pipe.set_condition_encoder(load_paired_encoder(args.control_adapter, unet=pipe.unet))
    except (OSError, ValueError) as err:
        raise CommandError(f"--adapter {args.control_adapter}: {one_line(err, first=True)}") from None
    return pipe


def control_call_kwargs(args, pipe, index: int = 0) -> dict:
    """Extra __call__ arguments of image ``index`` for --control_image: its condition, resized to the
    output size, and --control_scale where the pipeline takes it."""
    if not args.control_image:
        return {}
    import inspect

    from ..control import load_condition_image

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the pipeline's default
    path = args.control_image[index % len(args.control_image)]
    kwargs = {"image": load_condition_image(path, args.height or size, args.width or size)}
    if args.control_scale is not None and "control_scale" in inspect.signature(pipe.__call__).parameters:
        kwargs["control_scale"] = args.control_scale
    return kwargs


def set_scheduler(pipe, name: str) -> str:

    cls, extra = scheduler_class(name)
    compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])} | {type(pipe.scheduler).__name__}
    if cls.__name__ not in compatible:
        raise CommandError(
            f"--scheduler {name} ({cls.__name__}) does not fit this model's {type(pipe.scheduler).__name__}; "
            f"compatible: {', '.join(sorted(compatible))}"
        )
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return cls.__name__


def make_grid(images: list, cols: int | None = None):
    """The images side by side, ``cols`` per row (default: a near-square grid)."""
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def pipeline_default_guidance(pipe, fallback: float = 7.5) -> float:
    """The ``guidance_scale`` default of the pipeline's ``__call__`` (FluxPipeline 3.5: the value its
    guidance embedding was distilled around; StableDiffusion3Pipeline 7.0; Stable Diffusion 7.5)."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    default = None if param is None else param.default
    return float(default) if isinstance(default, (int, float)) else fallback


def run(args) -> int:
    check_args(args)
    import torch

    from .. import inference

    device, dtype = resolve_device_and_dtype(args)
    pipe = load_pipeline(args, dtype)
    if args.guidance_scale is None:
        args.guidance_scale = pipeline_default_guidance(pipe)
    names = []
    if args.adapter:
        names = inference.load_adapters(pipe, args.adapter, weights=args.adapter_scale)
    scheduler = set_scheduler(pipe, args.scheduler) if args.scheduler else type(pipe.scheduler).__name__
    if args.merge:
        inference.merge_adapter(pipe)
    if args.cpu_offload:
        try:
            pipe.enable_model_cpu_offload(device=None if args.device == "auto" else args.device)
        except (RuntimeError, ImportError, ValueError) as err:
            raise CommandError(f"--cpu_offload: {one_line(err, first=True)}") from None
    else:
        pipe.to(device)

    seed = args.seed if args.seed is not None and args.seed >= 0 else random.randrange(2**31)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, files = [], []
    for i in range(args.num_images):
        extra = control_call_kwargs(args, pipe, i)
        pipe.set_progress_bar_config(desc=f"image {i + 1}/{args.num_images}", disable=False)
        generator = torch.Generator("cpu").manual_seed(seed + i)  # the same images on any device
        image = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            generator=generator,
            **extra,
        ).images[0]
        path = out / f"{i:03d}-seed{seed + i}.png"
        image.save(path)
        images.append(image)
        files.append(path)
        print(f"wrote {path}")
    grid = out / "grid.png"
    make_grid(images).save(grid)
    scales = inference.active_adapters(pipe)
    settings = {
        "model": args.model,
        "adapters": [
            {"file": str(Path(f).resolve()), "name": n, "scale": scales.get(n)}
            for f, n in zip(args.adapter, names, strict=True)
        ],
        "merged": bool(args.merge),
        **(
            {
                "control_images": [str(Path(c).resolve()) for c in args.control_image],
                "control_scale": args.control_scale,
            }
            if args.control_image
            else {}
        ),
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": scheduler,
        "height": images[0].height,
        "width": images[0].width,
        "dtype": str(dtype).replace("torch.", ""),
        "images": [{"file": p.name, "seed": seed + i} for i, p in enumerate(files)],
    }
    (out / "generation.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {grid}")
    print(f"{len(files)} image(s), grid and generation.json in {out.resolve()}")
    return 0
