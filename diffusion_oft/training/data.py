"""Training data: image folders checked up front, deterministic crops, and a resumable data order.

The order of examples and every random crop depend only on (seed, epoch, index), never on a
global RNG that other code consumes, so a run resumed from a checkpoint sees exactly the batches
an uninterrupted run would have seen.  ``StreamBatchSampler`` treats the data as an endless
stream of per-epoch permutations and gives each process its share of every global batch (DDP
without accelerate's dataloader wrapping).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..console import UserFacingWarning
from ..files import one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def mix_seed(*values: int) -> int:
    """A 63-bit seed derived from several integers (independent streams per (seed, step, rank)...)."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def list_images(
    folder: str | Path, flag: str = "--instance_data_dir", allow_empty: bool = False, strict: bool = False
) -> list[Path]:
    """The images in ``folder`` (sorted; hidden files and sub-folders skipped), each checked to be readable.

    A file that is not an image (by suffix) or cannot be read (corrupt, zero bytes, a decompression
    bomb past Pillow's limit) is skipped with one warning that counts and names them; with
    ``strict`` the first one stops with an error instead.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise ValueError(f"{flag} {folder}: not a folder")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() == ".txt" and any(path.with_suffix(s).is_file() for s in IMAGE_SUFFIXES):
            continue  # an image's caption (kohya's convention), not a stray file
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problem = (
                f"{flag} {folder}: {path.name} is not an image (expected {', '.join(IMAGE_SUFFIXES)}); "
                "move it out of the folder"
            )
        else:
            problem = image_problem(path, flag)
        if problem is None:
            images.append(path)
        elif strict:
            raise ValueError(problem)
        else:
            skipped.append(path.name)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        message = (
            f"{flag} {folder}: skipped {len(skipped)} of {len(skipped) + len(images)} files that are not "
            f"readable images ({shown}); pass --strict to stop on them instead"
        )
        warnings.warn(message, BadDataWarning, stacklevel=1)
    if not images and not allow_empty:
        raise ValueError(f"{flag} {folder}: the folder holds no images" + (" it can read" if skipped else ""))
    return images


class BadDataWarning(UserFacingWarning):
    """Training files that were skipped (not images, unreadable)."""


def image_problem(path: Path, flag: str) -> str | None:
    try:
        check_image(path, flag)
    except ValueError as err:
        return str(err)
    return None


def check_image(path: Path, flag: str) -> None:
    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums
        with Image.open(path) as img:
            img.load()  # and the pixel data: verify() misses truncated JPEGs
    except Exception as err:  # PIL raises several types for broken files
        reason = one_line(err, first=True)
        raise ValueError(f"{flag}: {path} is not a readable image ({reason})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """Any readable image as 8-bit RGB: EXIF orientation applied; first frame of animations;
    transparency composited on white; 16-bit scaled to 8-bit; CMYK / palette / grayscale converted."""
    with Image.open(path) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            array = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if array.max(initial=0) > 255 else 255.0
            img = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def resize_and_crop(
    image: Image.Image, resolution: int, center_crop: bool, rng: np.random.Generator | None
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` and crop a square (center, or random from ``rng``).

    Returns the crop, the original size (h, w) and the crop's top-left (top, left) in resized
    coordinates (SDXL's micro-conditioning).
    """
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((nw, nh), Image.BILINEAR)
    if center_crop or rng is None:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top = int(rng.integers(0, nh - resolution + 1))
        left = int(rng.integers(0, nw - resolution + 1))
    return resized.crop((left, top, left + resolution, top + resolution)), (h, w), (top, left)


def to_tensor(image: Image.Image, normalize: bool = True) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1] (``normalize``) or [0, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return array * 2.0 - 1.0 if normalize else array


def sidecar_caption(path: Path) -> str | None:
    """The caption of an image from ``<name>.txt`` next to it (kohya's convention), or None."""
    txt = Path(path).with_suffix(".txt")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8").strip()
        return text or None
    return None


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and class images for prior preservation), keyed by (index, epoch).

    Length is max(instances, class images) with prior preservation (as in diffusers): item i pairs
    instance i % n_instance with class image i % n_class.
    """

    def __init__(
        self,
        instance_images: Sequence[Path],
        resolution: int,
        center_crop: bool,
        seed: int,
        class_images: Sequence[Path] | None = None,
    ):
        self.instance_images = list(instance_images)
        self.class_images = list(class_images or [])
        self.resolution = resolution
        self.center_crop = center_crop
        self.seed = seed

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    skip_pixels = False  # True once the VAE latents are cached: items then carry no pixels (None)

    def _load(self, path: Path, rng: np.random.Generator) -> dict:
        if self.skip_pixels:
            meta = getattr(self, "_meta", {})
            if path not in meta:  # fixed crops: the same sizes at every step, read once
                item = self._load_pixels(path, rng)
                meta[path] = {"original_size": item["original_size"], "crop_top_left": item["crop_top_left"]}
                self._meta = meta
            return {"pixels": None, **meta[path], "path": path}
        return self._load_pixels(path, rng)

    def _load_pixels(self, path: Path, rng: np.random.Generator) -> dict:
        crop, original, top_left = resize_and_crop(load_rgb(path), self.resolution, self.center_crop, rng)
        return {"pixels": to_tensor(crop), "original_size": original, "crop_top_left": top_left, "path": path}

    def all_images(self) -> list[Path]:
        return [*self.instance_images, *self.class_images]

    def crops_are_fixed(self) -> bool:
        """Whether every image gives the same pixels at every step (center crop, or square images)."""
        if self.center_crop:
            return True
        for path in self.all_images():
            with Image.open(path) as img:
                if img.size[0] != img.size[1]:  # EXIF rotation keeps a square square
                    return False
        return True

    def pixels_of(self, path: Path) -> torch.Tensor:
        """(3, H, W) in [-1, 1]: what ``__getitem__`` gives for ``path`` when ``crops_are_fixed()``."""
        return to_tensor(resize_and_crop(load_rgb(path), self.resolution, True, None)[0])

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        instance = self.instance_images[index % len(self.instance_images)]
        item = {"instance": self._load(instance, rng)}
        item["instance"]["caption"] = sidecar_caption(instance)
        if self.class_images:
            path = self.class_images[index % len(self.class_images)]
            item["class"] = self._load(path, rng)
            item["class"]["caption"] = sidecar_caption(path)
        return item


def collate_dreambooth(examples: list[dict]) -> dict:
    """Instances first, then class images (the loss splits the batch in two halves)."""
    parts = [ex["instance"] for ex in examples]
    n_instance = len(parts)
    if "class" in examples[0]:
        parts += [ex["class"] for ex in examples]
    return {
        # None when the dataset skips the pixels (their VAE latents are cached)
        "pixel_values": None if parts[0]["pixels"] is None else torch.stack([p["pixels"] for p in parts]),
        "original_sizes": [p["original_size"] for p in parts],
        "crop_top_lefts": [p["crop_top_left"] for p in parts],
        "num_instance": n_instance,
        "image_paths": [p.get("path") for p in parts],
        "instance_captions": [p.get("caption") for p in parts[:n_instance]],  # None: --instance_prompt
        "class_captions": [p.get("caption") for p in parts[n_instance:]],  # None: --class_prompt
    }


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_examples)


class StreamBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys from an endless stream of per-epoch permutations.

    Global micro-batch k covers stream positions [k·B·W, (k+1)·B·W) (B: per-process batch size,
    W: processes); process r takes its slice [r·B, (r+1)·B) of it.  ``start_batch`` skips batches
    (resuming), ``num_batches`` bounds the iteration.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        num_batches: int,
        start_batch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if num_examples < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.start_batch, self.num_batches = start_batch, num_batches
        self.num_replicas, self.rank = num_replicas, rank
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.n, self.seed, epoch)}
        return self._perm_cache[epoch]

    def keys(self, batch: int) -> list[tuple[int, int]]:
        start = (batch * self.num_replicas + self.rank) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.n)
            out.append((int(self._perm(epoch)[offset]), epoch))
        return out

    def epoch_of(self, batch: int) -> int:
        return (batch * self.num_replicas * self.batch_size) // self.n

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in range(self.start_batch, self.start_batch + self.num_batches):
            yield self.keys(batch)

    def __len__(self) -> int:
        return self.num_batches


def make_dataloader(dataset, collate_fn, sampler: StreamBatchSampler, num_workers: int = 0):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=False,
    )
