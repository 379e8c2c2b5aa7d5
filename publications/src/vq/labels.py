"""Label maps: BraTS tumour labels and the phantom's tissue labels, read and cut like the image stacks.

BraTS `<ID>_seg.nii.gz`: 0 no tumour, 1 necrosis, 2 oedema, 4 enhancing tumour.
The phantom also writes `<ID>_tissue.nii.gz` beside the BraTS files (not part of the
BraTS file set): the majority tissue of each brain voxel, for the tissue-contrast metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vq.dataloader.preprocess import central_slices, pad_or_crop
from vq.nifti import NiftiError, load_volume
from vq.sequences import subject_file

BRATS_LABELS: dict[str, int] = {"necrosis": 1, "oedema": 2, "enhancing": 4}
"""BraTS tumour labels (0 = no tumour)."""
TUMOUR_REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}
"""Whole tumour, tumour core, enhancing tumour."""
TISSUE = "tissue"
"""File suffix of the phantom's tissue label map."""
TISSUE_LABELS: dict[str, int] = {"csf": 1, "gm": 2, "wm": 3, "oedema": 4, "necrosis": 5, "enhancing": 6}
"""Labels of the phantom's tissue map (0 = background)."""


def load_labels(path: str | Path, allowed: tuple[int, ...] | None = (0, *BRATS_LABELS.values())) -> np.ndarray:
    """A label map -> (X, Y, Z) uint8 in RAS+, read by `vq.nifti.load_volume` in the file's own dtype.

    All zeros allowed: a tumour-free segmentation. `allowed`: the labels a file may hold (None: any).
    """
    labels = load_volume(path, dtype=None, empty_ok=True).data
    if allowed is not None:
        unknown = sorted(set(np.unique(labels).tolist()) - set(allowed))
        if unknown:
            raise NiftiError(f"{path}: labels {unknown} are not among {allowed}")
    return labels.astype(np.uint8)


def label_stack(labels: np.ndarray, n_slices: int, n: int, crop: int) -> torch.Tensor:
    """(X, Y, Z) labels -> (S, crop, crop) int64 on the slices and crop of `load_eval_stack`
    (central `n` of the cache's central `n_slices`, nested as there: the two differ by one for odd n)."""
    stack = labels.transpose(2, 0, 1)[central_slices(labels.shape[2], n_slices)]  # (Z,X,Y) -> (n_slices,X,Y)
    return torch.from_numpy(pad_or_crop(stack[central_slices(n_slices, n)], crop, fill=0).astype(np.int64))


def tissue_file(root: str | Path, name: str) -> Path | None:
    """The phantom's tissue map of a subject, or None where there is none (real data)."""
    path = Path(root) / name / subject_file(name, TISSUE)
    return path if path.is_file() else None


@dataclass(frozen=True)
class ContrastSpec:
    """Which labelled classes the tissue-contrast metric compares, relative to which one."""

    classes: dict[str, int]
    reference_label: int
    """Label of the reference region (intersected with the brain)."""
    reference_name: str


PHANTOM_CONTRAST = ContrastSpec({k: v for k, v in TISSUE_LABELS.items() if k != "wm"}, TISSUE_LABELS["wm"], "wm")
"""The phantom: every tissue relative to white matter."""
BRATS_CONTRAST = ContrastSpec(BRATS_LABELS, 0, "normal brain")
"""BraTS: the tumour compartments relative to the brain outside the tumour."""


def subject_labels(root: str | Path, name: str, naming: str = "brats2021") -> tuple[Path, ContrastSpec] | None:
    """The label map the contrast metric uses for a subject: the phantom's tissue map where there is
    one, else the BraTS segmentation, else None (test subjects need no segmentation)."""
    tissue = tissue_file(root, name)
    if tissue is not None:
        return tissue, PHANTOM_CONTRAST
    seg = Path(root) / name / subject_file(name, "seg", naming)
    return (seg, BRATS_CONTRAST) if seg.is_file() else None
