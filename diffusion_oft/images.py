"""Image grids saved as PNG: validation grids of training, the judge's and the evaluations' figures."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def image_grid(rows: list[list[Image.Image]], min_cell: int = 64, labels: list[str] | None = None) -> Image.Image:
    """Rows of images (each row may have its own length) pasted on a white canvas; tiny images are
    upscaled (nearest) to ``min_cell`` pixels so that a grid from a 32 px model is still visible."""
    cell_w = max(max(img.width for img in row) for row in rows if row)
    cell_h = max(max(img.height for img in row) for row in rows if row)
    scale = max(1, -(-min_cell // min(cell_w, cell_h)))
    cw, ch = cell_w * scale, cell_h * scale
    label_h = 14 if labels else 0
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * cw, len(rows) * (ch + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = r * (ch + label_h)
        if labels:
            draw.text((2, y + 1), labels[r][: max(8, cols * cw // 6)], fill="black")
        for c, img in enumerate(row):
            grid.paste(
                img.convert("RGB").resize((img.width * scale, img.height * scale), Image.NEAREST), (c * cw, y + label_h)
            )
    return grid


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
