"""Control training data: (image, condition, caption) from an image folder with metadata.jsonl or a
`datasets` dataset, the condition read from a column or built on the fly (``--condition canny``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..conditions import make_condition
from .data import BadDataWarning, check_image, load_rgb, resize_and_crop, to_tensor


class ControlRecords:
    """Indexable records {"image": PIL or path, "conditioning_image": PIL/path/None, "text": str}."""

    def __init__(self, items=None, dataset=None, columns=None):
        self.items, self.dataset, self.columns = items, dataset, columns

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if self.items is not None:
            return self.items[i]
        row = self.dataset[int(i)]
        image_col, cond_col, text_col = self.columns
        return {
            "image": row[image_col],
            "conditioning_image": row.get(cond_col) if cond_col else None,
            "text": row[text_col] if text_col else "",
        }


def _open(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return ImageOps.exif_transpose(value).convert("RGB")
    return load_rgb(value)


def records_from_folder(
    folder: str | Path, image_column: str, cond_column: str, caption_column: str, need_condition: bool
) -> ControlRecords:
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(
            f"--train_data_dir {folder}: no metadata.jsonl (one JSON object per line with "
            f'"{image_column}", "{cond_column}" and "{caption_column}")'
        )
    items, no_caption = [], []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{meta}:{n}: expected a JSON object per line, got {type(row).__name__}")
        if image_column not in row:
            raise ValueError(f"{meta}:{n}: no {image_column!r} field (see --image_column)")
        image = folder / row[image_column]
        if not image.is_file():
            raise ValueError(f"{meta}:{n}: {row[image_column]} does not exist in {folder}")
        check_image(image, "--train_data_dir")
        cond = None
        if need_condition:
            if cond_column not in row:
                raise ValueError(
                    f"{meta}:{n}: no {cond_column!r} field (see --conditioning_image_column, "
                    "or build conditions on the fly with --condition canny)"
                )
            cond = folder / row[cond_column]
            if not cond.is_file():
                raise ValueError(f"{meta}:{n}: {row[cond_column]} does not exist in {folder}")
            check_image(cond, "--train_data_dir")
        caption = row.get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            no_caption.append(n)  # missing, null, empty or not text: trained with the empty prompt
            caption = ""
        items.append({"image": image, "conditioning_image": cond, "text": caption})
    if not items:
        raise ValueError(f"{meta}: no examples")
    if no_caption:
        warnings.warn(
            f"{meta}: {len(no_caption)} of {len(items)} rows have no {caption_column!r} caption "
            f"(lines {no_caption[:5]}{'...' if len(no_caption) > 5 else ''}); they train with the "
            "empty prompt",
            BadDataWarning,
            stacklevel=2,
        )
    return ControlRecords(items=items)


def records_from_dataset(
    name: str, config: str | None, image_column: str, cond_column: str, caption_column: str, need_condition: bool
) -> ControlRecords:
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset_name needs the datasets package: pip install datasets") from None
    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(name, config)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"--dataset_name {name}: no 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    cols = ds.column_names
    if image_column not in cols:
        raise ValueError(f"--image_column {image_column!r} is not a column of {name} (columns: {cols})")
    if need_condition and cond_column not in cols:
        raise ValueError(
            f"--conditioning_image_column {cond_column!r} is not a column of {name} (columns: {cols}); "
            "or build conditions on the fly with --condition canny"
        )
    text = caption_column if caption_column in cols else None
    if text is None:
        raise ValueError(f"--caption_column {caption_column!r} is not a column of {name} (columns: {cols})")
    return ControlRecords(dataset=ds, columns=(image_column, cond_column if need_condition else None, text))


class ControlDataset(torch.utils.data.Dataset):
    """Items keyed by (index, epoch): same crop for image and condition, deterministic empty prompts."""

    def __init__(
        self,
        records: ControlRecords,
        resolution: int,
        center_crop: bool,
        seed: int,
        condition: str = "none",
        proportion_empty_prompts: float = 0.0,
        thresholds=(100.0, 200.0),
    ):
        self.records, self.resolution, self.center_crop, self.seed = records, resolution, center_crop, seed
        self.condition, self.proportion_empty = condition, proportion_empty_prompts
        self.thresholds = thresholds

    def __len__(self) -> int:
        return len(self.records)

    skip_pixels = False  # True once the VAE latents are cached: items then carry no pixels (None)

    def _is_file(self, index: int) -> bool:
        return isinstance(self.records[index]["image"], (str, Path))

    def fingerprint(self, index: int) -> tuple:
        """What keys row ``index``'s latents: its image file's (path, size, mtime), or the row itself
        for in-memory images (a ``datasets`` row does not change during a run)."""
        from .latents import file_fingerprint

        if self._is_file(index):
            return file_fingerprint(self.records[index]["image"])
        return (f"row {index}", 0, 0)

    def crops_are_fixed(self) -> bool:
        """Whether every image gives the same pixels at every step (center crop, or square images)."""
        if self.center_crop:
            return True
        for i in range(len(self)):
            value = self.records[i]["image"]
            if isinstance(value, (str, Path)):
                with Image.open(value) as img:
                    size = img.size
            else:
                size = value.size
            if size[0] != size[1]:
                return False
        return True

    def pixels_of(self, index: int) -> torch.Tensor:
        """(3, H, W) in [-1, 1]: what ``__getitem__`` gives for row ``index`` when ``crops_are_fixed()``."""
        image = _open(self.records[index]["image"])
        return to_tensor(resize_and_crop(image, self.resolution, True, None)[0])

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index, 0xC0])
        record = self.records[index]
        image = _open(record["image"])
        crop, original, top_left = resize_and_crop(image, self.resolution, self.center_crop, rng)
        if self.condition != "none":
            cond = make_condition(crop, self.condition, *self.thresholds)
        else:
            cond_img = _open(record["conditioning_image"]).resize(image.size, Image.BILINEAR)
            scale = self.resolution / min(image.size)
            size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
            top, left = top_left
            cond = cond_img.resize(size, Image.BILINEAR).crop(
                (left, top, left + self.resolution, top + self.resolution)
            )
        text = record["text"]
        if self.proportion_empty and rng.random() < self.proportion_empty:
            text = ""
        return {
            "index": index,
            "pixels": None if self.skip_pixels else to_tensor(crop),
            "conditioning": to_tensor(cond, normalize=False),
            "text": text,
            "original_size": original,
            "crop_top_left": top_left,
        }


def collate_control(examples: list[dict]) -> dict:
    return {
        # None when the dataset skips the pixels (their VAE latents are cached)
        "pixel_values": None if examples[0]["pixels"] is None else torch.stack([e["pixels"] for e in examples]),
        "indices": [e["index"] for e in examples],
        "conditioning": torch.stack([e["conditioning"] for e in examples]),
        "texts": [e["text"] for e in examples],
        "original_sizes": [e["original_size"] for e in examples],
        "crop_top_lefts": [e["crop_top_left"] for e in examples],
    }
