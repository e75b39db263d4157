"""`convert --to lora` on SD 1.5's UNet: rank, file size and error of the LoRA per method and setting.

Builds ``UNet2DConditionModel(cross_attention_dim=768)`` (SD 1.5's architecture, random weights), puts
each method (the DreamBooth script's defaults) on to_q/to_k/to_v/to_out.0 of all 16 attention blocks
(128 projections) and moves its parameters as training would (see ``moved``).  Per setting it reports
the LoRA's per-layer ranks, its file size (float32 factors) and the relative Frobenius error of each
layer's weight change; for the default setting of each method it also writes the LoRA with
``diffusion_oft.convert.convert`` (the file size measured) and compares the UNet's output with the
LoRA applied (W + B A) against the merged adapter's, relative to the adapter's change of the output.

    python benchmarks/lora_export.py                 # all methods, ~6 minutes on one CPU thread
    python benchmarks/lora_export.py --methods oft   # one method

Writes benchmarks/results/lora_export.md and lora_export.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The DreamBooth script's per-method structure defaults (diffusion_oft.training.args.DREAMBOOTH_DEFAULTS).
METHODS = {
    "oft": dict(method="oft", num_blocks=4),
    "boft": dict(method="boft", num_blocks=8, n_butterfly_factors=2),
    "ether": dict(method="ether", num_blocks=4),
    "ether_plus": dict(method="ether_plus", num_blocks=4),
}
# Settings per method: (label, rank, max_error); None/None = the default (ETHER/ETHER+ exact, OFT/BOFT 5 %).
SETTINGS = {
    "oft": [
        ("rank 4", 4, None),
        ("rank 16", 16, None),
        ("rank 64", 64, None),
        ("rank 256", 256, None),
        ("max_error 0.05 (default)", None, None),
        ("max_error 0.01", None, 0.01),
        ("full rank", None, 0.0),
    ],
    "ether": [("exact (default)", None, None), ("rank 2", 2, None)],
}
SETTINGS["boft"] = SETTINGS["oft"]
SETTINGS["ether_plus"] = [("exact (default)", None, None), ("rank 8", 8, None), ("rank 4", 4, None)]


@torch.no_grad()
def moved(unet: torch.nn.Module, method: str, seed: int = 0) -> None:
    """Parameters away from their init as after training: 0.3 randn, scaled per method so that each
    block's transform moves a comparable amount (OFT/BOFT: skew entries 0.3/sqrt(b), about 0.3 of
    rotation per block; ETHER: u random (a reflection in any direction); ETHER+: v = -u + 0.3 randn |u|/sqrt(b),
    H+ about 0.3 away from I)."""
    import diffusion_oft as do

    g = torch.Generator().manual_seed(seed)
    for _, layer in do.model.named_ortho_layers(unet):
        m = layer.ortho_adapters["default"]
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "skew":
                b = m.block_size
                p.copy_(0.3 * noise / b**0.5)
            elif name.startswith("u_"):
                p.copy_(noise)
            elif name.startswith("v_"):
                u = getattr(m, "u_" + name[2:])
                p.copy_(-u + 0.3 * noise * u.norm(dim=-1, keepdim=True) / u.shape[-1] ** 0.5)


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(cross_attention_dim=768).eval()


def inputs(latent: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, latent, latent, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g)


@torch.no_grad()
def unet_out(unet, x) -> torch.Tensor:
    return unet(*x).sample


@torch.no_grad()
def singular_values(unet) -> dict[str, tuple[torch.Tensor, tuple[int, int], bool]]:
    """{layer: (singular values of ΔW, (out, in), structural)} with the adapter loaded, not merged."""
    import diffusion_oft as do
    from diffusion_oft.methods.transforms import LowRankBlockTransform

    out = {}
    for path, layer in do.model.named_ortho_layers(unet):
        w = layer.base_layer.weight.double()
        delta = layer.adapted_weight(["default"], dtype=torch.float64) - w
        transforms, magnitude = layer._transforms("default")
        structural = magnitude is None and all(isinstance(t, LowRankBlockTransform) for t in transforms.values())
        out[path] = (torch.linalg.svdvals(delta), tuple(w.shape), structural)
    return out


def structural_rank(unet, path: str) -> int:
    layer = unet.get_submodule(path)
    transforms, _ = layer._transforms("default")
    n = sum(t.left.shape[0] * t.left.shape[2] for t in transforms.values())
    return min(n, *layer.base_layer.weight.shape)


def setting_row(svals, unet, rank, max_error) -> dict:
    from diffusion_oft.convert.lora import DEFAULT_MAX_ERROR, choose_rank

    ranks, errors, params = [], [], 0
    for path, (s, (d_out, d_in), structural) in svals.items():
        if structural and rank is None and max_error is None:
            r, e = structural_rank(unet, path), 0.0
        else:
            limit = max_error
            if rank is None and max_error is None:
                limit = DEFAULT_MAX_ERROR
            if structural:  # the structure's rank bounds the factorization (it is exact there)
                s = s[: structural_rank(unet, path)]
            r, e = choose_rank(s, rank, limit)
        ranks.append(r)
        errors.append(e)
        params += r * (d_out + d_in)
    return {
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "rank_mean": sum(ranks) / len(ranks),
        "size_mib": params * 4 / 2**20,
        "error_max": max(errors),
        "error_mean": sum(errors) / len(errors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--latent", type=int, default=32, help="latent size of the output check (32 = 256 px)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_export"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    import diffusion_oft as do
    from diffusion_oft.convert import convert

    started = time.time()
    unet = build_unet()
    x = inputs(args.latent)
    base_out = unet_out(unet, x)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="lora_export_"))
    for method in args.methods:
        t0 = time.time()
        config = do.AdapterConfig(**METHODS[method])
        do.add_adapter(unet, config)
        moved(unet, method)
        adapter = tmp / f"{method}.safetensors"
        do.save_adapter(unet, adapter)
        svals = singular_values(unet)
        rows = [(label, rank, err, setting_row(svals, unet, rank, err)) for label, rank, err in SETTINGS[method]]
        # the merged model's output, then the base weights back exactly (kept aside, not unmerged)
        saved = {p: layer.base_layer.weight.detach().clone() for p, layer in do.model.named_ortho_layers(unet)}
        do.merge_adapter(unet)
        merged_out = unet_out(unet, x)
        layers = dict(do.model.named_ortho_layers(unet))
        for path, layer in layers.items():
            layer.base_layer.weight.data.copy_(saved[path])
        for layer in layers.values():
            layer.merged_adapters = []  # the base weights are back (copied), so nothing is merged any more
        do.remove_adapter(unet)
        # the default export through the converter, then its factors applied: W + B A (float32), as
        # diffusers' fuse_lora does
        file = convert(adapter, "lora", tmp / f"{method}_lora.safetensors", model=unet)
        assert not do.model.named_ortho_layers(unet)
        state = load_file(str(file))
        for path in layers:
            up, down = state[f"unet.{path}.lora_B.weight"], state[f"unet.{path}.lora_A.weight"]
            unet.get_submodule(path).weight.data.add_(up @ down)
        lora_out = unet_out(unet, x)
        for path in layers:
            unet.get_submodule(path).weight.data.copy_(saved[path])
        change = (merged_out - base_out).norm().item()
        out_err = (lora_out - merged_out).norm().item() / change
        entry = {
            "method": method,
            "config": config.to_dict(),
            "adapter_parameters": sum(t.numel() for t in do.files.read_adapter_file(adapter)[0].values()),
            "adapter_file_mib": adapter.stat().st_size / 2**20,
            "dense_float32_mib": sum(o * i for _, (o, i), _ in svals.values()) * 4 / 2**20,
            "default_lora_file_mib": file.stat().st_size / 2**20,
            "default_output_error": out_err,
            "output_change_rel": change / base_out.norm().item(),
            "settings": [{"setting": label, "rank": rank, "max_error": err, **row} for label, rank, err, row in rows],
            "seconds": time.time() - t0,
        }
        results.append(entry)
        print(
            f"{method}: adapter {entry['adapter_file_mib']:.2f} MiB, default LoRA file "
            f"{entry['default_lora_file_mib']:.2f} MiB, UNet output error {out_err:.2e} of the adapter's change "
            f"({entry['seconds']:.0f} s)",
            flush=True,
        )
        for r in entry["settings"]:
            print(
                f"  {r['setting']:>26}: rank {r['rank_min']}-{r['rank_max']} (mean {r['rank_mean']:.1f}), "
                f"{r['size_mib']:.2f} MiB, error max {r['error_max']:.4f} mean {r['error_mean']:.4f}",
                flush=True,
            )

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "latent": args.latent,
        "seconds": time.time() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(markdown(results, meta))
    print(f"wrote {out.with_suffix('.md')} and .json ({meta['seconds']:.0f} s)")
    return 0


NAMES = {"oft": "OFT n=4", "boft": "BOFT n=8 m=2", "ether": "ETHER n=4", "ether_plus": "ETHER+ n=4 (two-sided)"}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# `convert --to lora` on SD 1.5's UNet architecture ({meta['date']})",
        "",
        "Random weights, 128 attention projections, adapter parameters moved as training would "
        "(`benchmarks/lora_export.py`). Rank: per layer (min-max); size: float32 factors; error: relative "
        "Frobenius error of each layer's weight change (max / mean over layers). Output error: "
        "||UNet(W + BA) - UNet(W')|| over ||UNet(W') - UNet(W)|| (and over ||UNet(W')||) at a "
        f"{meta['latent']}x{meta['latent']} latent, "
        "for the default setting.",
        "",
        "| method | adapter | `--to diff` (float32) | --to lora setting | rank | LoRA size | error max / mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in results:
        adapter = f"{e['adapter_file_mib']:.2f} MiB | {e['dense_float32_mib']:.1f} MiB"
        for i, r in enumerate(e["settings"]):
            rank = str(r["rank_min"]) if r["rank_min"] == r["rank_max"] else f"{r['rank_min']}-{r['rank_max']}"
            err = "0 (exact)" if r["error_max"] == 0 else f"{r['error_max']:.4f} / {r['error_mean']:.4f}"
            first = (NAMES[e["method"]], adapter) if i == 0 else ("", " | ")
            lines.append(f"| {first[0]} | {first[1]} | {r['setting']} | {rank} | {r['size_mib']:.2f} MiB | {err} |")
    lines += ["", "Default export through `convert` (file as written) and the UNet output error:", ""]
    lines += [
        "| method | LoRA file | output error, of the adapter's change | of the output "
        "| adapter's change, of the output |",
        "|---|---|---|---|---|",
    ]
    for e in results:
        lines.append(
            f"| {NAMES[e['method']]} | {e['default_lora_file_mib']:.2f} MiB | {e['default_output_error']:.2e} "
            f"| {e['default_output_error'] * e['output_change_rel']:.2e} | {e['output_change_rel']:.3f} |"
        )
    lines += [
        "",
        f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), {meta['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
