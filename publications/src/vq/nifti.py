"""Reading and writing volumes with their geometry (affine and header kept): the one place NIfTI files are opened.

Axial slices are taken along the last array axis of a volume in closest-canonical
(RAS+) orientation, which is how BraTS files are stored. Volumes in any other
orientation are brought there on reading and sent back on writing, so that a
prediction overlays its source in any viewer.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from vq.files import write_atomic


class NiftiError(ValueError):
    """A file that is missing, unreadable or unusable, named in the message."""


_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError,
                zlib.error, gzip.BadGzipFile, ValueError)
"""What nibabel raises for a missing, truncated or foreign file."""


@dataclass
class Volume:
    """A volume as an array in RAS+ orientation plus what it takes to write back."""

    data: np.ndarray  # (X, Y, Z) float32 (label maps: the file's dtype), axial slices along Z
    image: nib.Nifti1Image  # the file's own image: affine, header, orientation
    path: Path

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine

    @property
    def ras_affine(self) -> np.ndarray:
        """(4, 4) voxel index of `data` (RAS+ order) -> world mm."""
        return self.image.affine @ nib.orientations.inv_ornt_aff(_to_ras(self.image), self.image.shape[:3])


def open_image(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI file's image with its geometry; its voxels are read only when asked for (`load_volume`).

    Raises NiftiError naming the file when it is missing or not NIfTI.
    """
    path = Path(path)
    if not path.is_file():
        raise NiftiError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> NiftiError:
    return NiftiError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})")


def load_volume(path: str | Path, *, dtype=np.float32, empty_ok: bool = False) -> Volume:
    """Load a 3D NIfTI file, check it is finite and (unless `empty_ok`) non-empty, reorient to RAS+.

    `dtype`: of the returned data; None keeps the file's own (label maps, `vq.labels.load_labels`).
    Raises NiftiError naming the file for anything a user can fix.
    """
    path = Path(path)
    image = open_image(path)
    try:
        data = np.asarray(image.dataobj, dtype=dtype)
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from None
    data = np.squeeze(data)
    if data.ndim != 3:
        hint = "" if data.ndim < 3 else "; take one volume out of the series first (e.g. fslroi)"
        raise NiftiError(f"{path}: expected a 3D volume, got a {data.ndim}D image of shape {data.shape}{hint}")
    if not np.isfinite(data).all():
        raise NiftiError(f"{path}: volume contains NaN or Inf values")
    if not empty_ok and not data.any():
        raise NiftiError(f"{path}: volume is all zeros")
    data = nib.orientations.apply_orientation(data, _to_ras(image))
    return Volume(np.ascontiguousarray(data, dtype=dtype), image, path)


def _to_ras(image: nib.Nifti1Image) -> np.ndarray:
    """Orientation transform from the image's voxel axes to RAS+."""
    src = nib.orientations.io_orientation(image.affine)
    return nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt("RAS"))


def save_like(data: np.ndarray, like: Volume | nib.Nifti1Image, path: str | Path, *,
              dtype=np.float32) -> Path:
    """Write `data` (RAS+ array, same shape as `like.data`) in `like`'s own geometry.

    The result has the source file's affine, header and voxel order, so it
    overlays the source in any viewer.
    """
    image = like.image if isinstance(like, Volume) else like
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(image.affine))
    back = nib.orientations.apply_orientation(np.asarray(data), ornt).astype(dtype)
    if back.shape != image.shape[:3]:
        raise ValueError(f"data shape {back.shape} does not match {image.shape[:3]} of the reference image")
    header = image.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(back, image.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    # atomic: a killed run never leaves a half-written volume under the final name
    return write_atomic(path, lambda f: f.write(out.to_bytes() if not str(path).endswith(".gz")
                                                 else gzip.compress(out.to_bytes(), compresslevel=1)))


def ras_shape(image: nib.Nifti1Image) -> tuple[int, int, int]:
    """Shape of the image's array once reoriented to RAS+ (as `load_volume` returns it)."""
    ornt = _to_ras(image)
    return tuple(int(image.shape[int(ax)]) for ax in ornt[:, 0].argsort())


def to_intensity(data: np.ndarray) -> np.ndarray:
    """Model output in [-1, 1] -> written intensities in [0, 1] (background 0).

    1 corresponds to the normalisation's clip point (2 x the 99th percentile).
    """
    return np.clip((np.asarray(data, dtype=np.float32) + 1) / 2, 0, 1)
