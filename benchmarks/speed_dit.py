"""Training-step speed of orthogonal adapters on a FLUX.1 transformer at its real widths.

Builds ``FluxTransformer2DModel`` with FLUX.1-dev's widths (hidden 3072 = 24 heads x 128, T5 width
4096, pooled 768, guidance embedding) but only ``--double`` joint and ``--single`` single blocks (random
weights, so that it fits CPU memory), puts each adapter on the default DiT targets (the joint attention's
``to_q/k/v``, ``to_out.0``, ``add_q/k/v_proj``, ``to_add_out`` and the single blocks' ``to_q/k/v``), and
times one training step (forward + backward, batch 1) against the frozen base (gradient to the input
only).  Each case's step is bracketed by frozen-base steps (base, case, base, ...) and recorded as its
time over the mean of the two base steps around it; the medians of those ratios over the rounds are the
figures to read (a shared machine's drifts cancel).  Process CPU time (one thread) is recorded beside
the wall time: it does not count the time the process waits for a core on a busy machine.  Every visit
puts the adapter on, runs one untimed step (first-forward allocations), one timed step, and takes the
adapter off again.

    python benchmarks/speed_dit.py --threads 1                 # 1 + 1 blocks, 128 image + 32 text tokens
    python benchmarks/speed_dit.py --threads 1 --json benchmarks/results/speed_dit_cpu.json

``peft`` is needed for the PEFT rows (LoRA r=32, OFT b=32 on the same targets).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import diffusion_oft as do
from diffusion_oft.config import JOINT_ATTENTION_TARGETS


@dataclass
class Case:
    name: str
    kind: str  # "base" | "ours" | "peft"
    make: Callable[[], object] | None = None
    peft_ref: str | None = None  # the PEFT case of the same structure, when there is one


def cases(with_peft: bool) -> list[Case]:
    targets = list(JOINT_ATTENTION_TARGETS)

    def ours(method: str, **kw):
        return lambda: do.AdapterConfig(method=method, target_modules=targets, **kw)

    def peft_lora(r: int):
        import peft

        return lambda: peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets)

    def peft_oft(b: int, neumann: bool):
        import peft

        return lambda: peft.OFTConfig(oft_block_size=b, r=0, target_modules=targets, use_cayley_neumann=neumann)

    out = [
        Case("frozen base", "base"),
        Case("oft b=32 (default)", "ours", ours("oft"), "peft oft b=32 exact"),
        Case("boft b=8 m=2 (default)", "ours", ours("boft")),
        Case("ether n=4 (default)", "ours", ours("ether")),
        Case("ether_plus n=4 (default)", "ours", ours("ether_plus")),
    ]
    if with_peft:
        out += [
            Case("peft lora r=32", "peft", peft_lora(32)),
            Case("peft oft b=32 exact", "peft", peft_oft(32, neumann=False)),
        ]
    return out


def build_transformer(double: int, single: int) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return model.train()


def make_inputs(latent_h: int, latent_w: int, text_tokens: int) -> dict[str, torch.Tensor]:
    from diffusion_oft.training.families import latent_image_ids

    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, latent_h * latent_w // 4, 64, generator=g),  # packed 2x2 latents
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=g),
        "pooled_projections": torch.randn(1, 768, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": latent_image_ids(latent_h, latent_w),
        "txt_ids": torch.zeros(text_tokens, 3),
    }


def apply_case(model: nn.Module, case: Case) -> Callable[[], None]:
    """Put the case's adapter on; returns the function that takes it off again."""
    if case.kind == "base":
        model.requires_grad_(False)
        return lambda: None
    if case.kind == "ours":
        do.add_adapter(model, case.make())
        return lambda: do.remove_adapter(model)
    from peft import inject_adapter_in_model

    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model.requires_grad_(False)
    inject_adapter_in_model(case.make(), model)
    for name, p in model.named_parameters():
        p.requires_grad_(any(tag in name for tag in ("lora_", "oft_")))

    def restore():
        for name, linear in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
        model.requires_grad_(False)
        model.__dict__.pop("peft_config", None)

    return restore


def train_step(model: nn.Module, inputs: dict, case: Case) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    inputs = dict(inputs)
    if case.kind == "base":
        inputs["hidden_states"] = inputs["hidden_states"].detach().requires_grad_(True)
    start, cpu = time.perf_counter(), time.process_time()
    out = model(**inputs, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    elapsed = (time.perf_counter() - start, time.process_time() - cpu)
    model.zero_grad(set_to_none=True)
    return elapsed


def visit(model: nn.Module, inputs: dict, case: Case, results: dict) -> tuple[float, float]:
    restore = apply_case(model, case)
    results[case.name]["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_step(model, inputs, case)  # untimed: the first step after the adapter is put on
    elapsed = train_step(model, inputs, case)
    restore()
    gc.collect()
    return elapsed


def run(model, inputs, all_cases: list[Case], rounds: int) -> dict[str, dict]:
    """Per case: wall and CPU times, and their ratios to the mean of the two base steps around them."""
    results = {c.name: {"times": [], "cpu_times": [], "ratios": [], "cpu_ratios": [], "params": 0} for c in all_cases}
    base = all_cases[0]

    def record(case: Case, t: tuple[float, float]) -> None:
        results[case.name]["times"].append(t[0])
        results[case.name]["cpu_times"].append(t[1])

    for r in range(1, rounds + 1):
        before = visit(model, inputs, base, results)
        record(base, before)
        for case in all_cases[1:]:
            t = visit(model, inputs, case, results)
            after = visit(model, inputs, base, results)
            record(case, t)
            record(base, after)
            res = results[case.name]
            res["ratios"].append(t[0] / (0.5 * (before[0] + after[0])))
            res["cpu_ratios"].append(t[1] / (0.5 * (before[1] + after[1])))
            print(
                f"    {case.name}: {t[0]:.3f} s ({t[1]:.3f} s CPU), {res['ratios'][-1]:.3f} "
                f"({res['cpu_ratios'][-1]:.3f} CPU) of the base",
                file=sys.stderr,
                flush=True,
            )
            before = after
        print(f"  round {r}/{rounds} done", file=sys.stderr, flush=True)
    for res in results.values():
        res["median"] = statistics.median(res["times"])
        res["cpu_median"] = statistics.median(res["cpu_times"])
        res["ratio"] = statistics.median(res["ratios"]) if res["ratios"] else 1.0
        res["cpu_ratio"] = statistics.median(res["cpu_ratios"]) if res["cpu_ratios"] else 1.0
    return results


def print_table(all_cases: list[Case], results: dict[str, dict]) -> None:
    print(
        "| config | trainable params | step median (s) | / frozen base (wall, bracketed) "
        "| / frozen base (CPU time, bracketed) | / PEFT same config (CPU) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for case in all_cases:
        r, ref = results[case.name], results.get(case.peft_ref or "")
        to_peft = ""
        if ref and r["cpu_ratios"] and ref["cpu_ratios"]:
            pairs = zip(r["cpu_ratios"], ref["cpu_ratios"], strict=True)
            to_peft = f"{statistics.median(a / b for a, b in pairs):.3f}"
        print(
            f"| {case.name} | {r['params']:,} | {r['median']:.3f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} "
            f"| {to_peft} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1, help="joint (double-stream) blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument(
        "--latent",
        default="16x32",
        help="latent height x width before 2x2 packing (16x32: 128 image tokens, a 128x256 px image)",
    )
    parser.add_argument("--text_tokens", type=int, default=32, help="T5 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with_peft = not args.no_peft
    if with_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed: no PEFT rows", file=sys.stderr)
            with_peft = False
    h, w = (int(v) for v in args.latent.lower().split("x"))
    model = build_transformer(args.double, args.single)
    n_params = sum(p.numel() for p in model.parameters())
    inputs = make_inputs(h, w, args.text_tokens)
    all_cases = cases(with_peft)
    print(
        f"FluxTransformer2DModel, hidden 3072 (24 x 128), {args.double} joint + {args.single} single blocks, "
        f"{n_params / 1e6:.0f}M parameters, {h * w // 4} image + {args.text_tokens} text tokens, batch 1, fp32, "
        f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}\n"
    )
    results = run(model, inputs, all_cases, args.rounds)
    print_table(all_cases, results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "parameters": n_params, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
