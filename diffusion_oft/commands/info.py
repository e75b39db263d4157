"""`diffusion-oft info FILE`: what an adapter file holds."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="print an adapter file's method, config, targets, size and base-model hints")
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..files import adapter_info
    from ..inference import base_model_hints

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
        if cfg["method"] == "boft":
            structure += f", n_butterfly_factors={cfg['n_butterfly_factors']}"
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
