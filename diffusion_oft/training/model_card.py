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
    sample_prompt: str | None,
    how_to_use: str,
    tags: list[str],
    instance_prompt: str | None = None,
) -> Path:
    """Write ``<output_dir>/README.md`` and return its path.

    ``instance_prompt``: the prompt the subject is bound to (the card's YAML ``instance_prompt``, as in
    diffusers' DreamBooth cards); ``sample_prompt``: the prompt of the samples grid (validation)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", base_model=base_model, instance_prompt=instance_prompt, tags=tags)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = f"""# {title}

{summary}

| | |
| --- | --- |
{table}
"""
    if grid_file:
        body += f"\n## Samples\n\n![samples]({grid_file})\n"
        if sample_prompt:
            body += f"\nPrompt: `{sample_prompt}` (fixed seed).\n"
    body += f"\n## How to use\n\n```python\n{how_to_use.strip()}\n```\n"
    body += f"\n## Adapter config\n\n```json\n{json.dumps(config, indent=2, sort_keys=True)}\n```\n"
    body += "\nTrained with diffusion-oft (orthogonal finetuning adapters for diffusers).\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = Path(output_dir) / "README.md"
    card.save(str(path))
    return path
