"""`diffusion-oft info FILE`: what an adapter file holds."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="print an adapter file's method, config, targets, size and base-model hints (LoRA exports: "
        "layout, ranks, error)",
    )
    p.add_argument("file", help="adapter .safetensors file (or a LoRA export: file or folder)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert.lora import lora_file_info
    from ..files import adapter_info
    from ..inference import base_model_hints
    from ..methods import get_method_class

    lora = lora_file_info(args.file)
    if lora is not None:
        return _print_lora(lora, args.json)
    info = adapter_info(args.file)
    hints = base_model_hints(args.file)
    for comp, data in info["components"].items():
        data["base_model_hint"] = hints.get(comp)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.file}  (format version {info['format_version']})")
    for comp, data in info["components"].items():
        cfg = data["config"]
        structure = f"block_size={cfg['block_size']}" if cfg["block_size"] else f"num_blocks={cfg['num_blocks']}"
        for name in get_method_class(cfg["method"]).exclusive_fields:  # the fields only this method reads
            if cfg.get(name) is not None:
                structure += f", {name}={cfg[name]}"
        base = data["base_model"]
        print(f"  {comp}: {cfg['method']} ({structure}, side={cfg['side']}, cayley={cfg['cayley_mode']})")
        print(
            f"    targets: {', '.join(cfg['target_modules'] + cfg['extra_target_modules'])} "
            f"on {cfg['attention']} attention; {data['num_layers']} layers"
        )
        print(f"    parameters: {data['num_parameters']:,}")
        if data["base_model_hint"]:
            print(f"    base model: {data['base_model_hint']}")
        elif base:
            hint = f" from {base['name_or_path']}" if base.get("name_or_path") else ""
            print(f"    base model: {base.get('class', '?')}{hint}")
    return 0


def _print_lora(info: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    ranks = str(info["rank_min"]) if info["rank_min"] == info["rank_max"] else f"{info['rank_min']}-{info['rank_max']}"
    comps = ", ".join(f"{c}: {n} layers" for c, n in info["components"].items())
    print(f"{info['file']}  (LoRA, {info['layout']} layout; not an orthogonal adapter)")
    print(f"  {comps}; rank {ranks}; {info['size_bytes'] / 2**20:.2f} MiB")
    if info["source"]:
        methods = ", ".join(f"{c}: {cfg['method']} (side={cfg['side']})" for c, cfg in info["source"].items())
        print(f"  exported by {info['converted_by']} from {methods}")
        print(f"  base model: {info['base_model']}; max relative error per layer: {info['max_error']:.4g}")
    loader = "pipe.load_lora_weights(...) of diffusers" if info["layout"] == "diffusers" else "ComfyUI / A1111 / Forge"
    print(f"  load it with {loader}; diffusion-oft's load_adapter reads orthogonal adapters only")
    return 0
