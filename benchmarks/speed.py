"""Training-step speed and memory of orthogonal adapters on SD 1.5's UNet architecture.

Builds ``UNet2DConditionModel(cross_attention_dim=768)`` (SD 1.5's architecture) with random
weights, puts each adapter on ``to_q/to_k/to_v/to_out.0`` of every attention module, and times
one training step (forward + backward, batch 1) against the frozen base (gradient to the input
only), measured side by side: configurations are interleaved round by round so that machine noise
hits all of them alike, and the medians are compared.

    python benchmarks/speed.py --quick          # 256 px, our methods, about a minute
    python benchmarks/speed.py                  # 256 + 512 px, PEFT comparisons, compile, memory
    python benchmarks/speed.py --device cuda --dtype bf16 --resolutions 512 --batch 4
    python benchmarks/speed.py --projections-only --threads 1 --cpu-time   # the adapted projections alone

``peft`` is only needed for the PEFT rows (pip install -e ".[dev]").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import diffusion_oft as do
from diffusion_oft.layers import OrthoLinear

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PARTS = ("train", "flops", "compile", "memory", "inference", "projections")


@dataclass
class Case:
    name: str
    kind: str  # "base" | "ours" | "peft"
    make: Callable[[], object] | None = None  # AdapterConfig or a PEFT config
    peft_ref: str | None = None  # the PEFT case to compare against
    # OFT/BOFT: every block's generator set to this |S|_F after adding the adapter (a trained state;
    # the exact Cayley product's length grows with the largest |S|_F, see diffusion_oft.methods.cayley)
    generator_norm: float | None = None


def our(method: str, **kw) -> Callable[[], do.AdapterConfig]:
    return lambda: do.AdapterConfig(method=method, **kw)


def peft_config(kind: str, **kw) -> Callable[[], object]:
    def make():
        import peft

        if kind == "lora":
            return peft.LoraConfig(r=kw.get("r", 4), lora_alpha=kw.get("r", 4), target_modules=TARGETS)
        if kind == "oft":
            return peft.OFTConfig(
                oft_block_size=kw["block_size"],
                r=0,
                target_modules=TARGETS,
                use_cayley_neumann=kw.get("neumann", True),
            )
        if kind == "boft":
            return peft.BOFTConfig(
                boft_block_size=kw["block_size"], boft_n_butterfly_factor=kw["m"], target_modules=TARGETS
            )
        raise ValueError(kind)

    return make


def all_cases(quick: bool, with_peft: bool) -> list[Case]:
    cases = [
        Case("frozen base", "base"),
        Case("oft b=32 (default)", "ours", our("oft"), "peft oft b=32 exact"),
        Case("oft b=32 neumann", "ours", our("oft", cayley_mode="neumann"), "peft oft b=32 neumann"),
        Case("boft b=8 m=2 (default)", "ours", our("boft"), "peft boft b=8 m=2"),
        Case("ether n=4 (default)", "ours", our("ether")),
        Case("ether_plus n=4 (default)", "ours", our("ether_plus")),
    ]
    if quick:
        return [c for c in cases if "neumann" not in c.name]
    cases += [
        Case("oft b=32 (default), ‖S‖_F = 0.48", "ours", our("oft"), "peft oft b=32 exact", generator_norm=0.48),
        Case("boft b=8 m=2 (default), ‖S‖_F = 0.48", "ours", our("boft"), "peft boft b=8 m=2", generator_norm=0.48),
        Case("oft n=4 (paper r=4)", "ours", our("oft", num_blocks=4)),
        Case("boft b=8 m=4", "ours", our("boft", block_size=8, n_butterfly_factors=4), "peft boft b=8 m=4"),
    ]
    if with_peft:
        cases += [
            Case("peft lora r=4", "peft", peft_config("lora", r=4)),
            Case("peft oft b=32 exact", "peft", peft_config("oft", block_size=32, neumann=False)),
            Case("peft oft b=32 neumann", "peft", peft_config("oft", block_size=32, neumann=True)),
            Case("peft boft b=8 m=2", "peft", peft_config("boft", block_size=8, m=2)),
            Case("peft boft b=8 m=4", "peft", peft_config("boft", block_size=8, m=4)),
        ]
    return cases


def build_unet(device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)
    return unet.to(device=device, dtype=dtype).train()


def make_inputs(resolution: int, batch: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    latent = resolution // 8
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    return sample, torch.tensor([500] * batch, device=device), text


def apply_case(unet: nn.Module, case: Case) -> Callable[[], None]:
    """Put the case's adapter on the UNet; returns a function that restores the plain UNet."""
    if case.kind == "base":
        unet.requires_grad_(False)
        return lambda: None
    if case.kind == "ours":
        do.add_adapter(unet, case.make())
        if case.generator_norm is not None:
            set_generator_norms(unet, case.generator_norm)
        return lambda: do.remove_adapter(unet)
    from peft import inject_adapter_in_model

    originals = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    unet.requires_grad_(False)
    inject_adapter_in_model(case.make(), unet)
    for name, p in unet.named_parameters():
        p.requires_grad_(any(tag in name for tag in ("lora_", "oft_", "boft_")))

    def restore():
        for name, linear in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, linear)
        unet.requires_grad_(False)
        unet.__dict__.pop("peft_config", None)  # PEFT leaves its config behind; the next case starts clean

    return restore


def set_generator_norms(model: nn.Module, norm: float) -> None:
    """Give every OFT/BOFT block a random skew generator with |S|_F = ``norm`` (the stored strict upper
    triangle holds half of |S|_F^2), as after training; 0.46 to 0.5 take the longest exact product (5 factors)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".skew"):
                direction = torch.randn(param.shape, generator=gen).to(param)
                param.copy_(direction * (norm / (2**0.5 * direction.norm(dim=-1, keepdim=True))))


CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (robust on a busy machine)


def train_step(unet: nn.Module, inputs, case: Case, device: str) -> float:
    sample, t, text = inputs
    if case.kind == "base":
        sample = sample.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = CLOCK()
    out = unet(sample, t, text).sample
    out.float().pow(2).mean().backward()
    sync()
    elapsed = CLOCK() - start
    unet.zero_grad(set_to_none=True)
    return elapsed


def trainable(unet: nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def time_cases(
    unet, cases, inputs, rounds: int, device: str, compiled: bool = False, steps: int = 1
) -> dict[str, dict]:
    """Median and min step time of each case over interleaved rounds after a warm-up round.

    ``steps`` > 1: each visit of a case runs one untimed step, then ``steps`` timed ones, and
    records the fastest (the steady state of a training loop, without the first step's
    allocations after the adapter is put on; steadier on a machine whose memory system is noisy).

    Eager rounds also bracket every case by frozen-base steps (base, case 1, base, case 2, ..., base),
    and record each case's step over the mean of the two base steps around it: that ratio cancels the
    slow drifts of a shared machine, which the round-level interleaving alone does not. ``compiled``:
    each case is compiled once (``torch.compile``, Inductor) and timed for ``rounds`` steps after the
    compiling step, case after case."""
    results = {c.name: {"times": [], "ratios": [], "params": 0} for c in cases}
    base_case = next(c for c in cases if c.kind == "base")

    def step(case: Case, warm_up: bool) -> float:
        restore = apply_case(unet, case)
        results[case.name]["params"] = trainable(unet)
        if warm_up or steps > 1:
            train_step(unet, inputs, case, device)
        elapsed = float("nan") if warm_up else min(train_step(unet, inputs, case, device) for _ in range(steps))
        restore()
        gc.collect()
        return elapsed

    if compiled:  # one compilation per case (minutes on CPU), then `rounds` timed steps of it
        for case in cases:
            restore = apply_case(unet, case)
            results[case.name]["params"] = trainable(unet)
            torch._dynamo.reset()  # a fresh compilation per case (no cache-size fallback to eager)
            model = torch.compile(unet)
            results[case.name]["first_step_s"] = train_step(model, inputs, case, device)
            results[case.name]["times"] = [train_step(model, inputs, case, device) for _ in range(rounds)]
            print(f"    {case.name} compiled: {results[case.name]['times']}", file=sys.stderr, flush=True)
            restore()
            del model
            gc.collect()
    for r in range(rounds + 1 if not compiled else 0):  # round 0 is the warm-up
        if r == 0:
            for case in cases:
                t = step(case, warm_up=r == 0)
                if r:
                    results[case.name]["times"].append(t)
        else:
            before = step(base_case, False)
            results[base_case.name]["times"].append(before)
            for case in cases:
                if case is base_case:
                    continue
                t = step(case, False)
                after = step(base_case, False)
                results[case.name]["times"].append(t)
                results[case.name]["ratios"].append(t / (0.5 * (before + after)))
                results[base_case.name]["times"].append(after)
                ratio = results[case.name]["ratios"][-1]
                print(f"    {case.name}: {t:.3f} s, {ratio:.3f} of the base", file=sys.stderr, flush=True)
                before = after
        print(f"  round {r}/{rounds} done", file=sys.stderr, flush=True)
    for res in results.values():
        res["median"] = statistics.median(res["times"]) if res["times"] else float("nan")
        res["min"] = min(res["times"]) if res["times"] else float("nan")
        res["ratio"] = statistics.median(res["ratios"]) if res["ratios"] else 1.0
    return results


def print_training_table(cases: list[Case], results: dict[str, dict]) -> None:
    """Each case's step as ratios to the frozen base and to PEFT's same config: bracketed (median over
    rounds of the step over the mean of the base steps just before and after it; the figure to read),
    and of the median and minimum seconds."""
    print("\n### training step (forward + backward)\n")
    print(
        "| config | trainable params | step median (s) | step min (s) | / frozen base (bracketed) "
        "| / base (medians) | / base (mins) | / PEFT same config (bracketed) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = results["frozen base"]
    for case in cases:
        r = results[case.name]
        ref = results.get(case.peft_ref or "")
        to_peft = ""
        if ref and r["ratios"] and ref["ratios"]:
            to_peft = f"{statistics.median(a / b for a, b in zip(r['ratios'], ref['ratios'], strict=True)):.3f}"
        print(
            f"| {case.name} | {r['params']:,} | {r['median']:.3f} | {r['min']:.3f} | {r['ratio']:.3f} "
            f"| {r['median'] / base['median']:.3f} | {r['min'] / base['min']:.3f} | {to_peft} |",
            flush=True,
        )


def count_flops(unet, cases, inputs, device: str) -> dict[str, int]:
    """Floating-point operations of one training step per case (``FlopCounterMode``: matmuls,
    convolutions, attention, forward + backward): the machine-independent part of the cost."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for case in cases:
        restore = apply_case(unet, case)
        counter = FlopCounterMode(display=False)
        with counter:
            train_step(unet, inputs, case, device)
        flops[case.name] = counter.get_total_flops()
        restore()
    return flops


def print_ratio_table(title: str, column: str, values: dict[str, float], fmt="{:.2f}", ratio_fmt="{:.3f}") -> None:
    """A table of one value per case and its ratio to the frozen base's."""
    print(f"\n### {title}\n")
    print(f"| config | {column} | / frozen base |")
    print("| --- | ---: | ---: |")
    for name, value in values.items():
        print(f"| {name} | {fmt.format(value)} | {ratio_fmt.format(value / values['frozen base'])} |")


def forward_time(unet: nn.Module, inputs, device: str) -> float:
    sample, t, text = inputs
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        start = CLOCK()
        unet(sample, t, text)
        sync()
    return CLOCK() - start


def time_inference(unet, cases, inputs, rounds: int, device: str) -> dict[str, dict]:
    """No-grad eval forward of the base, and of each of our cases unmerged (transformed weights cached,
    computed once) and merged; per round, each case is bracketed by base forwards (see ``time_cases``)."""
    ours = [c for c in cases if c.kind == "ours"]
    names = ["frozen base"] + [f"{c.name} {mode}" for c in ours for mode in ("unmerged (cached)", "merged")]
    results = {name: {"times": [], "ratios": []} for name in names}
    unet.eval()
    for r in range(rounds + 1):
        before = forward_time(unet, inputs, device)
        for case in ours:
            do.add_adapter(unet, case.make())
            unet.eval()
            forward_time(unet, inputs, device)  # builds the cached weights
            t_unmerged = forward_time(unet, inputs, device)
            do.merge_adapter(unet)
            forward_time(unet, inputs, device)
            t_merged = forward_time(unet, inputs, device)
            do.unmerge_adapter(unet)
            do.remove_adapter(unet)
            after = forward_time(unet, inputs, device)
            if r:
                base = 0.5 * (before + after)
                results["frozen base"]["times"].append(before)
                for mode, t in (("unmerged (cached)", t_unmerged), ("merged", t_merged)):
                    results[f"{case.name} {mode}"]["times"].append(t)
                    results[f"{case.name} {mode}"]["ratios"].append(t / base)
            before = after
        print(f"  inference round {r}/{rounds} done", file=sys.stderr, flush=True)
    unet.train()
    for res in results.values():
        res["median"], res["min"] = statistics.median(res["times"]), min(res["times"])
        res["ratio"] = statistics.median(res["ratios"]) if res["ratios"] else 1.0
    return results


def projection_shapes(unet: nn.Module, inputs) -> Counter:
    """(input shape, input requires grad, d_in, d_out) -> count, of every targeted projection in one
    training forward of the UNet with OFT on (text K/V inputs never require grad, image tokens do
    downstream of the first adapter)."""
    found: Counter = Counter()
    do.add_adapter(unet, do.AdapterConfig(method="oft"))

    def record(module, args):
        x = args[0]
        found[(tuple(x.shape), x.requires_grad, module.in_features, module.out_features)] += 1

    hooks = [m.register_forward_pre_hook(record) for m in unet.modules() if isinstance(m, OrthoLinear)]
    sample, t, text = inputs
    unet(sample, t, text)
    for hook in hooks:
        hook.remove()
    do.remove_adapter(unet)
    return found


class ProjectionStack(nn.Module):
    """Every targeted projection of the UNet (same shapes, as many of each), with its own input and
    upstream gradient: forward + backward of all of them is the adapters' share of a training step
    without the rest of the UNet (and its noise). One adapter on the stack, so its transforms are
    built as in the UNet (one batched build per step)."""

    def __init__(self, shapes: Counter, gen: torch.Generator):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.inputs, self.upstream = [], []
        for (shape, needs_grad, d_in, d_out), count in shapes.items():
            for _ in range(count):
                block = nn.Module()
                block.to_q = nn.Linear(d_in, d_out)
                self.blocks.append(block)
                self.inputs.append(torch.randn(shape, generator=gen).requires_grad_(needs_grad))
                self.upstream.append(torch.randn(*shape[:-1], d_out, generator=gen))

    def step(self) -> None:
        loss = sum((blk.to_q(x) * up).sum() for blk, x, up in zip(self.blocks, self.inputs, self.upstream, strict=True))
        if loss.requires_grad:
            loss.backward()
        self.zero_grad(set_to_none=True)
        for x in self.inputs:
            x.grad = None


def time_projections(unet, cases, inputs, rounds: int, reps: int = 3) -> dict[str, float]:
    """Forward + backward of all the adapted projections of one UNet step (``ProjectionStack``), per
    case; interleaved rounds after a warm-up, median of the per-round times."""
    shapes = projection_shapes(unet, inputs)
    stacks = {}
    for case in cases:
        torch.manual_seed(0)
        stack = ProjectionStack(shapes, torch.Generator().manual_seed(0))
        apply_case(stack, case)
        stacks[case.name] = stack
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(rounds + 1):
        for name, stack in stacks.items():
            start = CLOCK()
            for _ in range(reps):
                stack.step()
            if r:
                times[name].append((CLOCK() - start) / reps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report_projections(unet, cases, inputs, rounds: int, res: int) -> dict[str, float]:
    """Times the adapted projections alone (``time_projections``) and prints their table."""
    projections = time_projections(unet, cases, inputs, max(rounds, 10))
    print(f"\n### adapted projections at {res} px: forward + backward of the targeted projections alone\n")
    print("| config | projections (ms per step) | / frozen projections | / PEFT same config |")
    print("| --- | ---: | ---: | ---: |")
    for case in cases:
        t = projections[case.name]
        ref = f"{t / projections[case.peft_ref]:.3f}" if case.peft_ref in projections else ""
        print(f"| {case.name} | {t * 1e3:.1f} | {t / projections['frozen base']:.3f} | {ref} |", flush=True)
    return projections


def peak_memory_of(case: Case, args, resolution: int) -> float:
    """Peak RSS (GB) of a fresh process that builds the UNet and runs two steps of one case."""
    cmd = [
        sys.executable,
        __file__,
        "--_memory_case",
        case.name,
        "--resolutions",
        str(resolution),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gb"]


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so that building the model does not
    count as the step's peak; False where /proc/self/clear_refs is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB -> GB
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(args) -> None:
    """Peak memory of two training steps after the UNet and the adapter are built (CUDA: allocated
    bytes; CPU: peak RSS since a reset of the kernel's mark, else since process start)."""
    dtype = DTYPES[args.dtype]
    case = next(c for c in all_cases(False, True) if c.name == args._memory_case)
    unet = build_unet(args.device, dtype)
    inputs = make_inputs(int(args.resolutions.split(",")[0]), args.batch, args.device, dtype)
    apply_case(unet, case)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset = args.device != "cuda" and _reset_peak_rss()
    for _ in range(2):
        train_step(unet, inputs, case, args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    elif reset:
        peak = _peak_rss_gb()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB, since process start
    print(json.dumps({"peak_gb": peak}))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 px, our methods only, ~1 minute")
    parser.add_argument("--resolutions", default=None, help="comma-separated pixel sizes (default 256,512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (median); default 2 quick, 3 full")
    parser.add_argument(
        "--steps",
        type=int,
        default=1,
        help="training: timed steps per visit of a case, after an untimed one when > 1 (the fastest is kept)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-inference", action="store_true", help="skip the eval-mode forward timings")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="only the configs whose name contains one of these strings (the frozen base is kept)",
    )
    parser.add_argument(
        "--projections",
        action="store_true",
        help="also time the adapted projections alone (fwd + bwd of a stack of every UNet projection)",
    )
    parser.add_argument("--projections-only", action="store_true", help="only the --projections table (fast)")
    parser.add_argument(
        "--parts",
        default=None,
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all but projections; --quick: train)",
    )
    parser.add_argument("--compile-rounds", type=int, default=1, help="timed rounds of the compiled models")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time instead of wall time (use with --threads 1 on a busy machine)",
    )
    parser.add_argument("--_memory_case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_case:
        return memory_child(args)

    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = DTYPES[args.dtype]
    with_peft = not args.no_peft and not args.quick
    try:
        import peft  # noqa: F401
    except ImportError:
        with_peft = False
    if args.parts:
        parts = set(args.parts.split(","))
        if parts - set(PARTS):
            parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    elif args.projections_only:
        parts = {"projections"}
    else:
        parts = {"train"} if args.quick else {"train", "flops", "compile", "memory", "inference"}
        parts -= {name for name in ("compile", "memory", "inference") if getattr(args, f"no_{name}")}
        if args.projections:
            parts.add("projections")
    resolutions = [int(r) for r in (args.resolutions or ("256" if args.quick else "256,512")).split(",")]
    rounds = args.rounds or (2 if args.quick else 3)
    cases = all_cases(args.quick, with_peft)
    if args.cases:
        cases = [c for c in cases if c.kind == "base" or any(key in c.name for key in args.cases)]
    print(
        f"# diffusion-oft speed benchmark: SD 1.5 UNet architecture (random weights), {args.device} {args.dtype}, "
        f"batch {args.batch}, adapters on {'/'.join(TARGETS)} of all attention modules"
    )
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, median and min of {rounds} interleaved rounds after a warm-up"
        + (f", fastest of {args.steps} steps per visit after an untimed one" if args.steps > 1 else "")
        + (", process CPU time" if args.cpu_time else ", wall time")
    )
    unet = build_unet(args.device, dtype)
    report = {}
    for res in resolutions:
        inputs = make_inputs(res, args.batch, args.device, dtype)
        print(f"\n## {res} px (latent {res // 8})")
        report[res] = part_results = {}
        if "train" in parts:
            part_results["results"] = results = time_cases(unet, cases, inputs, rounds, args.device, steps=args.steps)
            print_training_table(cases, results)
        if "flops" in parts:
            part_results["flops"] = flops = count_flops(unet, cases, inputs, args.device)
            print_ratio_table(
                "floating-point operations of a training step (FlopCounterMode)",
                "GFLOP",
                {name: f / 1e9 for name, f in flops.items()},
                "{:.1f}",
                "{:.4f}",
            )
        if "compile" in parts:
            compile_cases = [c for c in cases if c.kind != "peft"]
            part_results["compiled"] = compiled = time_cases(
                unet, compile_cases, inputs, args.compile_rounds, args.device, compiled=True
            )
            print("\n### torch.compile (Inductor) training step\n")
            eager = part_results.get("results", {})
            print("| config | first step incl. compiling (s) | compiled step (s) | / compiled base | eager step (s) |")
            print("| --- | ---: | ---: | ---: | ---: |")
            base_c = compiled["frozen base"]["median"]
            for case in compile_cases:
                c = compiled[case.name]
                e = f"{eager[case.name]['median']:.3f}" if case.name in eager else ""
                ratio = c["median"] / base_c
                print(f"| {case.name} | {c['first_step_s']:.0f} | {c['median']:.3f} | {ratio:.3f} | {e} |")
        if "memory" in parts:
            part_results["memory"] = memory = {c.name: peak_memory_of(c, args, res) for c in cases}
            print_ratio_table("peak memory of a training step (fresh process per row)", "peak (GB)", memory)
        if "inference" in parts:
            part_results["inference"] = inference = time_inference(unet, cases, inputs, rounds, args.device)
            print("\n### inference: no-grad forward in eval mode\n")
            print("| config | forward median (s) | forward min (s) | / frozen base (bracketed) | / base (mins) |")
            print("| --- | ---: | ---: | ---: | ---: |")
            base_min = inference["frozen base"]["min"]
            for name, t in inference.items():
                print(
                    f"| {name} | {t['median']:.3f} | {t['min']:.3f} | {t['ratio']:.3f} | {t['min'] / base_min:.3f} |",
                    flush=True,
                )
        if "projections" in parts:
            part_results["projections"] = report_projections(unet, cases, inputs, rounds, res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
