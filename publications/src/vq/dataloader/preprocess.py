"""Intensity normalisation, slice range and crop: one definition for training, testing and synthesis.

docs/method.md, "Data protocol": each volume is clipped to [0, 2 x 99th percentile]
and mapped linearly to [-1, 1]; the central 128 axial slices are used; images
are cropped to 192 x 192. Everything here works on any volume size, so the
synthesis tool applies the same steps to a user's own scans.
"""
from __future__ import annotations

import logging
import math
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


BRAIN_RANGE = (1.0, 99.0)
"""The brain's robust intensity range (percentiles of its voxels) on which inputs with negative values
(z-scored volumes) are matched to the model's convention."""
DEFAULT_BRAIN_REFERENCE = (-0.6, 0.0)
"""The brain's robust range in [-1, 1] assumed for a checkpoint saved without its training data's
(`intensity_reference`): about where the raw normalisation puts it."""


class IntensityError(ValueError):
    """A volume whose intensities cannot be brought onto the model's convention, named in the message."""


def brain_range(normalized: np.ndarray) -> tuple[float, float]:
    """The BRAIN_RANGE percentiles of the brain (voxels above the background -1) of a volume in [-1, 1]."""
    brain = np.asarray(normalized, np.float32)
    brain = brain[brain > -1]
    if brain.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(brain, BRAIN_RANGE)
    return float(lo), float(hi)


def prepare(volume: np.ndarray, percentile: float = 99.0, brain: np.ndarray | None = None,
            reference: tuple[float, float] | None = None, name: str = "volume") -> np.ndarray:
    """A raw volume -> the model's intensities in [-1, 1], background -1.

    Non-negative volumes (scanner intensities): `normalize`. A volume with negative values inside
    the brain (a z-scored volume, brain mean 0 and std 1; or negated) has lost its zero level, which the
    clip at 0 would turn the darker half of the brain into background with: instead the brain's robust
    range (BRAIN_RANGE percentiles) is mapped linearly onto `reference`, the same range of the model's
    training data (`intensity_reference` in its checkpoint), and everything outside the brain is background.
    brain: a boolean mask; default the nonzero voxels. Raises IntensityError where that cannot work.
    """
    volume = np.asarray(volume, dtype=np.float32)
    brain = volume != 0 if brain is None else np.asarray(brain, bool)
    if not brain.any():
        raise IntensityError(f"{name}: no nonzero voxels in the brain; nothing to translate")
    values = volume[brain]
    lo, hi = (float(v) for v in np.percentile(values, BRAIN_RANGE))
    if lo >= 0:  # scanner intensities (at most a trace of negative ringing, clipped to 0)
        return normalize(volume, percentile)
    if brain.all():
        raise IntensityError(f"{name}: the brain has negative intensities and no voxel is background (0), so "
                             "brain and background cannot be told apart; pass a brain mask")
    if hi - lo <= 1e-6 * max(abs(lo), abs(hi)):
        raise IntensityError(f"{name}: the brain's intensities are constant ({lo:.4g}); nothing to translate")
    ref_lo, ref_hi = reference or DEFAULT_BRAIN_REFERENCE
    out = np.full(volume.shape, -1.0, np.float32)
    out[brain] = np.clip(ref_lo + (values - lo) * np.float32((ref_hi - ref_lo) / (hi - lo)), -1.0, 1.0)
    log.info("%s: negative intensities inside the brain (z-scored?): its %g-%g%% range [%.3g, %.3g] is mapped onto "
             "the model's [%.2f, %.2f], background set to -1", name, *BRAIN_RANGE, lo, hi, ref_lo, ref_hi)
    return out


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
