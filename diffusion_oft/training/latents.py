"""VAE latents of the training images: encoded once, sampled every step.

The VAE encoder gives each image a diagonal Gaussian (its ``parameters``: mean and log-variance
stacked on the channels); the latent a step trains on is a sample of it drawn with the step's
generator.  :class:`LatentCache` keeps the parameters instead of re-encoding the pixels, and each
step samples from them with the same generator, so the latents are those of an uncached run as
long as the encoder returns the same parameters: exactly so when it sees the same batch shapes
(CPU kernels may differ in the last bits between batch 1 and larger batches).

An entry is keyed by the image file (path, size, mtime), the resolution and the crop mode: a file
rewritten on disk is encoded again at its next use.  Images that are no files (rows of a ``datasets``
dataset) are keyed by what ``fingerprint`` returns for them instead (the control trainer: the row's
index, fixed for the run).  The cache is built in a fixed order and
chunking (not in the order training visits the images), so a resumed run sees the same numbers.
Only images whose crop does not depend on the step can be cached: random crops of non-square
photos are a new variant almost every time (a 512 crop of a 768×512 photo has 257), so there the
trainer encodes every step instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch
from torch import nn


def scale_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Shift and scale VAE latents as the UNet expects."""
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def latent_distribution(parameters: torch.Tensor):
    """The VAE's diagonal Gaussian from its ``parameters`` (B, 2C, h, w), as ``vae.encode`` returns it."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(parameters)


def file_fingerprint(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


class LatentCache:
    """The encoder's output (``latent_dist.parameters``) per training image, on the VAE's device.

    ``load`` turns a path into the (3, H, W) pixels the dataset would give (same resize and crop).
    """

    def __init__(
        self,
        vae: nn.Module,
        load: Callable[[Path], torch.Tensor],
        resolution: int,
        crop: str,
        chunk_size: int = 8,
        fingerprint: Callable[[Hashable], tuple] | None = None,
    ):
        """``fingerprint(item)`` -> (identity, size, version) replaces the file's (path, size, mtime) for
        items that are not paths; the items are then used as given (not turned into paths)."""
        self.vae, self.load, self.resolution, self.crop = vae, load, resolution, crop
        self.fingerprint = fingerprint or file_fingerprint
        self._item = (lambda x: x) if fingerprint is not None else Path
        self.chunk_size = max(1, chunk_size)
        self.entries: dict[tuple, torch.Tensor] = {}  # key -> (2C, h, w)
        self._key_of: dict[str, tuple] = {}  # path -> its current key (a rewritten file drops the old entry)
        self.encoded = 0  # images encoded so far (tests, logs)

    def key(self, path: str | Path) -> tuple:
        return (*self.fingerprint(path), self.resolution, self.crop)

    @torch.no_grad()
    def _encode(self, paths: Sequence[Path]) -> None:
        for start in range(0, len(paths), self.chunk_size):
            chunk = paths[start : start + self.chunk_size]
            pixels = torch.stack([self.load(p) for p in chunk])
            params = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.parameters
            for p, row in zip(chunk, params, strict=True):
                key = self.key(p)
                old = self._key_of.get(key[0])
                if old is not None and old != key:
                    del self.entries[old]
                self.entries[key], self._key_of[key[0]] = row, key
            self.encoded += len(chunk)

    def build(self, paths: Sequence[str | Path]) -> LatentCache:
        """Encode every image not cached yet (in the given order, in chunks of ``chunk_size``)."""
        unique = list(dict.fromkeys(self._item(p) for p in paths))
        self._encode([p for p in unique if self.key(p) not in self.entries])
        return self

    def parameters(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """(B, 2C, h, w) for the images of a batch; a file changed on disk is encoded again."""
        keys = [self.key(p) for p in paths]
        stale = [self._item(p) for p, k in zip(paths, keys, strict=True) if k not in self.entries]
        stale = list(dict.fromkeys(stale))
        if stale:
            self._encode(stale)
        return torch.stack([self.entries[k] for k in keys])

    def distribution(self, paths: Sequence[str | Path]):
        return latent_distribution(self.parameters(paths))


def cache_dataset_latents(
    vae: nn.Module, dataset, args, log: Callable[[str], None], items: Sequence, chunk_size: int, fingerprint=None
) -> LatentCache | None:
    """Encode every training image of ``dataset`` once (the trainers' default): ``None`` when
    ``--no_cache_latents`` is set or the dataset's crops change between steps (random crops of
    non-square images).  The dataset then serves cache indices instead of pixels."""
    if not getattr(args, "cache_latents", True):
        return None
    if not dataset.crops_are_fixed():
        log(
            "VAE latents are encoded every step: random crops of non-square images differ at each step "
            "(--center_crop makes them cacheable)"
        )
        return None
    kwargs = {} if fingerprint is None else {"fingerprint": fingerprint}
    crop = "center" if args.center_crop else "square"
    cache = LatentCache(vae, dataset.pixels_of, args.resolution, crop, chunk_size=chunk_size, **kwargs)
    cache.build(items)
    dataset.skip_pixels = True  # the steps read the cache, not the pixels
    return cache
