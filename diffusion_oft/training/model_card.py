"""Model cards (README.md in the output folder) for trained adapters.

The YAML header follows diffusers' training cards (library_name, base_model, instance_prompt, tags);
the body says what was trained, how, and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_model_card(
    output_dir: str | Path,
    base_model: str,
    title: str,
    summary: str,
    rows: list[tuple[str, str]],
    config: dict,
    grid_file: str | None,
    prompt: str | None,
    how_to_use: str,
    tags: list[str],
) -> Path:
    """Write ``<output_dir>/README.md`` and return its path."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", base_model=base_model, instance_prompt=prompt, tags=tags)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = f"""# {title}

{summary}

| | |
| --- | --- |
{table}
"""
    if grid_file:
        body += f"\n## Samples\n\n![samples]({grid_file})\n"
        if prompt:
            body += f"\nPrompt: `{prompt}` (fixed seed).\n"
    body += f"\n## How to use\n\n```python\n{how_to_use.strip()}\n```\n"
    body += f"\n## Adapter config\n\n```json\n{json.dumps(config, indent=2, sort_keys=True)}\n```\n"
    body += "\nTrained with diffusion-oft (orthogonal finetuning adapters for diffusers).\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = Path(output_dir) / "README.md"
    card.save(str(path))
    return path
