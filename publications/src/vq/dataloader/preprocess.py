"""Intensity normalisation, slice range and crop: one definition for training, testing and synthesis.

docs/method.md, "Data protocol": each volume is clipped to [0, 2 x 99th percentile]
and mapped linearly to [-1, 1]; the central 128 axial slices are used; images
are cropped to 192 x 192. Everything here works on any volume size, so the
synthesis tool applies the same steps to a user's own scans.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from vq.config import DataConfig

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped whenever the preprocessing below changes meaning; cached slices of another version are rebuilt."""


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing settings of a run. They are part of the config each checkpoint stores;
    `vq.cli.load_trained_model` warns when a config normalises differently from that run."""

    percentile: float = 99.0
    n_slices: int = 128
    crop: int = 192
    cache_dtype: str = "float16"
    version: int = VERSION

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocessing:
        return cls(percentile=data.percentile, n_slices=data.n_slices, crop=data.crop, cache_dtype=data.cache_dtype)

    def cache_key(self) -> dict:
        """The settings that change cached slices (the crop is applied on reading, so it is not one)."""
        key = {"percentile": float(self.percentile), "n_slices": int(self.n_slices), "version": self.version}
        if self.cache_dtype != "float16":  # float16 caches made before this setting keep their folder
            key["dtype"] = self.cache_dtype
        return key


def clip_value(volume: np.ndarray, percentile: float = 99.0) -> float:
    """The upper clip point 2 x p-th percentile of a volume.

    The percentile is over ALL voxels, background included, as in the reference
    (np.percentile of the whole volume): with ~85% background in BraTS the 99th
    percentile still falls inside the brain. If it is 0 (brain under 1% of the
    volume), fall back to the percentile of the positive voxels rather than the
    max, which a single hot voxel would dominate.
    """
    p = float(np.percentile(volume, percentile))
    if p <= 0:
        positive = volume[volume > 0]
        if positive.size == 0:
            raise ValueError("volume has no positive voxels; cannot normalise")
        p = float(np.percentile(positive, percentile))
        log.warning("%g-th percentile of the volume is 0 (tiny foreground); using the %g-th percentile "
                    "of its %d positive voxels (%.4g) instead", percentile, percentile, positive.size, p)
    return 2.0 * p


def normalize(volume: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Clip to [0, 2 x p-th percentile] and map linearly to [-1, 1] (0 -> -1, clip point -> 1); float32."""
    volume = np.asarray(volume, dtype=np.float32)
    top = clip_value(volume, percentile)
    return (np.clip(volume, 0.0, top) * np.float32(2.0 / top) - 1.0).astype(np.float32, copy=False)


def central_slices(n_total: int, n: int) -> slice:
    """The central `n` of `n_total` slices (BraTS: 155 -> 13:141 for n = 128)."""
    if n > n_total:
        raise ValueError(f"volume has {n_total} axial slices, fewer than the {n} central slices required")
    start = (n_total - n) // 2
    return slice(start, start + n)


def _fit(length: int, size: int, start: int | None) -> tuple[slice, slice]:
    """Source and destination ranges on one axis: crop at `start` (default centred) or pad centred."""
    if length >= size:
        start = (length - size) // 2 if start is None else start
        if not 0 <= start <= length - size:
            raise ValueError(f"crop start {start} out of range 0..{length - size}")
        return slice(start, start + size), slice(0, size)
    before = (size - length) // 2
    return slice(0, length), slice(before, before + length)


def pad_or_crop(image: np.ndarray, size: int | tuple[int, int], start: tuple[int | None, int | None] = (None, None),
                fill: float = -1.0) -> np.ndarray:
    """(..., H, W) -> (..., h, w): crop each axis longer than the target at `start` (None: centred),
    pad each shorter one centred with `fill` (-1 is background).

    Centred fitting is its own inverse: `pad_or_crop(pad_or_crop(x, s), x.shape[-2:])` gives back x
    wherever x was kept, so a prediction on a crop can be put back in the input's grid.
    """
    h, w = (size, size) if isinstance(size, int) else size
    src_h, dst_h = _fit(image.shape[-2], h, start[0])
    src_w, dst_w = _fit(image.shape[-1], w, start[1])
    out = np.full(image.shape[:-2] + (h, w), fill, dtype=image.dtype)
    out[..., dst_h, dst_w] = image[..., src_h, src_w]
    return out


def center_crop_2d(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Centre crop (or -1 pad) the last two axes; the valid/test crop of docs/method.md."""
    return pad_or_crop(image, size)
