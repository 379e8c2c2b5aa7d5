"""Sources on different grids: a common working grid, resampling through the affines, rigid registration.

Sequences of one scanner visit share its coordinates, so a voxel of one maps to a voxel of
another through their affines (voxel index -> world mm, RAS). Synthesis brings every source
onto one working grid: the first source's axes and field of view at the model's training
spacing (1 mm), axial slices along its last RAS+ axis; it translates there and resamples
the prediction back (tools/synthesize.py). Scans that are not aligned (another scanner visit,
patient motion) get a rigid transform from `register_rigid` (SimpleITK, Mattes mutual
information). A `world` matrix below maps world points of the grid being filled to world
points of the image read (identity for aligned scans).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from vq.nifti import NiftiError, Volume, load_volume

log = logging.getLogger(__name__)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""RAS (NIfTI world) <-> LPS (ITK world); its own inverse."""
SHRINK = [4, 2, 1]
"""Registration's resolution levels (downsampling factors)."""
SAMPLES = 50_000
"""Random points of the mutual information per level: enough for a stable 32-bin histogram, and a
brain-sized volume registers in seconds at full resolution."""
STRIPPED_MAX_FOREGROUND = 0.5
"""A skull-stripped scan is mostly background (BraTS: about 15% brain); above this share of non-zero voxels, warn."""


@dataclass(frozen=True)
class Grid:
    affine: np.ndarray  # (4, 4) voxel index -> world mm (RAS)
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)  # (3,) mm per voxel step


def grid_of(volume: Volume) -> Grid:
    """The grid of a volume's RAS+ array (`volume.data`)."""
    return Grid(volume.ras_affine, volume.data.shape)


def working_grid(grid: Grid, spacing: float = 1.0) -> Grid:
    """`grid`'s axes and field of view (same centre) sampled every `spacing` mm on each axis."""
    axes = grid.affine[:3, :3] / grid.spacing  # (3, 3) unit voxel axes as columns
    shape = np.maximum(1, np.round(np.asarray(grid.shape) * grid.spacing / spacing)).astype(int)
    centre = grid.affine[:3, :3] @ ((np.asarray(grid.shape) - 1) / 2) + grid.affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = axes * spacing
    affine[:3, 3] = centre - affine[:3, :3] @ ((shape - 1) / 2)
    return Grid(affine, tuple(int(n) for n in shape))


def resample(data: np.ndarray, src: Grid, dst: Grid, world: np.ndarray | None = None, order: int = 1) -> np.ndarray:
    """(src.shape) -> (dst.shape) float32: trilinear (order 1) or nearest (order 0), 0 outside `src`.

    Where a destination voxel spans several source voxels (a 1 mm image onto 5 mm slices), the
    source is first smoothed with a Gaussian of sigma (span - 1) / 2 voxels on that axis, so thin
    structures are averaged as a thick slice would, not aliased.
    """
    index = np.linalg.inv(src.affine) @ (np.eye(4) if world is None else world) @ dst.affine  # dst voxel -> src voxel
    if np.asarray(data).shape == tuple(dst.shape) and np.allclose(index, np.eye(4), atol=1e-6):
        return np.asarray(data, np.float32)
    data = np.asarray(data, np.float32)
    if order > 0:
        span = np.abs(index[:3, :3]).max(axis=1)  # (3,) source voxels crossed by one destination step
        sigma = np.maximum(span - 1, 0) / 2
        if sigma.any():
            data = ndimage.gaussian_filter(data, sigma, mode="constant")
    return ndimage.affine_transform(data, index[:3, :3], index[:3, 3], output_shape=tuple(dst.shape),
                                    order=order, mode="constant", cval=0.0, prefilter=False)


def coverage(src: Grid, dst: Grid, world: np.ndarray | None = None) -> np.ndarray:
    """(dst.shape) bool: the destination voxels that lie inside `src`'s field of view."""
    return resample(np.ones(src.shape, np.float32), src, dst, world, order=0) > 0.5


def to_sitk(data: np.ndarray, grid: Grid):
    """(X, Y, Z) array on `grid` -> a SimpleITK image at the same place in the world (ITK's is LPS)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)))  # (X,Y,Z) -> ITK's (Z,Y,X)
    axes = (LPS @ grid.affine)[:3, :3] / grid.spacing
    image.SetSpacing(grid.spacing.tolist())
    image.SetDirection(axes.ravel().tolist())  # row-major, columns are the voxel axes
    image.SetOrigin((LPS @ grid.affine)[:3, 3].tolist())
    return image


def register_rigid(fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid, seed: int = 0):
    """Rigid transform that aligns `moving` to `fixed`: Mattes mutual information (32 bins, about
    SAMPLES random points per level), three resolutions (shrink 4, 2, 1; smoothing 2, 1, 0 mm), started
    from the images' centres of mass. -> ((4, 4) world matrix, fixed RAS point -> moving RAS point; the SimpleITK
    transform, fixed LPS point -> moving LPS point, as ITK writes it to a .tfm file).
    """
    import SimpleITK as sitk

    fixed_image, moving_image = to_sitk(fixed, fixed_grid), to_sitk(moving, moving_grid)
    transform = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    transform = sitk.Euler3DTransform(transform)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    voxels = np.prod(fixed.shape) / np.array(SHRINK, float) ** 3
    # SimpleITK reads seed 0 as sitkWallClock (a new seed every call): shift ours so every seed is fixed
    reg.SetMetricSamplingPercentagePerLevel(np.minimum(1.0, SAMPLES / voxels).tolist(), seed + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(SHRINK)
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed_image, moving_image)
    log.info("registration: %d iterations, Mattes MI %.4f (%s)", reg.GetOptimizerIteration(), reg.GetMetricValue(),
             reg.GetOptimizerStopConditionDescription())
    lps = np.eye(4)
    matrix, centre = np.reshape(transform.GetMatrix(), (3, 3)), np.asarray(transform.GetCenter())
    lps[:3, :3] = matrix
    lps[:3, 3] = centre + np.asarray(transform.GetTranslation()) - matrix @ centre  # A (x - c) + c + t
    return LPS @ lps @ LPS, transform


def align(sources: dict, register: bool, seed: int = 0) -> tuple[dict, dict]:
    """{key: Volume} -> ({key: (4, 4) world matrix, first source's RAS point -> that source's}, {key: its SimpleITK
    transform}): identity for scans of one scanner visit, or with `register` each other source registered
    rigidly to the first (`register_rigid`)."""
    (first_key, first), *others = sources.items()
    world, transforms = {key: np.eye(4) for key in sources}, {}
    for key, vol in others if register else []:
        world[key], transforms[key] = register_rigid(first.data, grid_of(first), vol.data, grid_of(vol), seed)
        log.info("registered %s to %s", vol.path.name, first.path.name)
    return world, transforms


def on_working_grid(sources: dict, world: dict, mask_path: Path | None = None, spacing: float = 1.0):
    """Every source ({key: Volume}) on the working grid of the first (`working_grid`), through `world`.
    -> (grid, {key: (X, Y, Z) raw}, {key: (X, Y, Z) bool field of view}, (X, Y, Z) bool brain mask or None).

    With `mask_path` (a mask on the first source's grid or aligned to it) every source is masked; a source
    that does not overlap the first's brain is an error; one that does not look skull-stripped is named.
    """
    first = next(iter(sources.values()))
    work = working_grid(grid_of(first), spacing)
    mask = None
    if mask_path is not None:
        mask_vol = load_volume(mask_path)
        mask = resample(mask_vol.data != 0, grid_of(mask_vol), work, order=0) > 0.5
        if not mask.any():
            raise NiftiError(f"{mask_path}: the mask does not overlap {first.path}; give a mask of the first source")
    data, seen, brain = {}, {}, mask
    for key, vol in sources.items():
        data[key] = resample(vol.data, grid_of(vol), work, world[key])
        seen[key] = coverage(grid_of(vol), work, world[key])
        if brain is None:  # the first source's non-zero voxels
            brain = data[key] != 0
        if not (seen[key] & brain).any():
            raise NiftiError(f"{vol.path}: no overlap with {first.path} in scanner coordinates; pass --register "
                             "if the scans are from different scanner visits, or check the file's affine")
        foreground = (vol.data != 0).mean()
        if mask is not None:
            data[key] *= mask
        elif foreground > STRIPPED_MAX_FOREGROUND:
            log.warning("%s: %.0f%% of the field of view is non-zero, so it does not look skull-stripped; the model "
                        "was trained on skull-stripped scans: pass --mask BRAIN_MASK or skull-strip it first "
                        "(e.g. HD-BET, SynthStrip)", vol.path, 100 * foreground)
    return work, data, seen, mask
