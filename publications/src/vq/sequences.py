"""The MRI sequences, their order, and the availability codes of the data lists.

One home for every fact about sequence names (docs/method.md, "Sequence index order
everywhere"), the file names of a subject's files (BraTS2021 or BraSyn naming), the
4-bit availability codes 1..14 of the valid/test lists, and the "missing" pairing of
training subjects (n mod 3).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SEQUENCES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Sequence names in index order: 0 = t1, 1 = t1ce (T1Gd), 2 = t2, 3 = flair."""

DISPLAY_NAMES: dict[str, str] = {"t1": "T1", "t1ce": "T1Gd", "t2": "T2", "flair": "FLAIR"}
SEG = "seg"
"""BraTS label file suffix: 1 necrosis, 2 oedema, 4 enhancing tumour."""

NAMINGS = ("brats2021", "brasyn")
"""File naming of a subject folder <ID>/: BraTS2021 `<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`, or BraSyn
(BraTS 2023 on) `<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz`."""
BRASYN_NAMES: dict[str, str] = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
"""This project's sequence names -> BraSyn's file suffixes."""

N_SEQ = len(SEQUENCES)
CODES = range(1, 2**N_SEQ - 1)
"""Valid availability codes: at least one sequence present and at least one missing."""

# Training "missing" setting: each subject keeps two neighbouring sequences (docs/method.md).
TRAIN_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (2, 3))


def subject_file(subject: str, kind: str, naming: str = "brats2021") -> str:
    """The file name of a subject's sequence (by name), segmentation (`seg`) or other label map (its
    suffix, e.g. the phantom's `tissue`) under a naming of NAMINGS."""
    if naming == "brasyn":
        return f"{subject}-{BRASYN_NAMES.get(kind, kind)}.nii.gz"
    return f"{subject}_{kind}.nii.gz"


def find_subject_file(folder: str | Path, kind: str, namings: Iterable[str] = NAMINGS) -> Path | None:
    """A subject's file of `kind` in its folder `<ID>/`, under the first of `namings` that has it,
    `.nii.gz` before `.nii` (uncompressed) in any naming; None when there is none."""
    folder = Path(folder)
    names = [subject_file(folder.name, kind, naming) for naming in namings]
    for name in names + [name.removesuffix(".gz") for name in names]:
        if (folder / name).is_file():
            return folder / name
    return None


def file_naming(path: str | Path, subject: str) -> str:
    """The naming of NAMINGS a subject's file is in: BraTS2021's `<ID>_...`, else BraSyn's `<ID>-...`."""
    return "brats2021" if Path(path).name.startswith(f"{subject}_") else "brasyn"


def seq_index(name: str | int) -> int:
    """Index of a sequence given by name (case-insensitive, 'T1Gd' accepted) or index."""
    if isinstance(name, int):
        if not 0 <= name < N_SEQ:
            raise ValueError(f"sequence index {name} out of range 0..{N_SEQ - 1}")
        return name
    key = name.strip().lower()
    key = {"t1gd": "t1ce", "t1c": "t1ce"}.get(key, key)
    if key not in SEQUENCES:
        raise ValueError(f"unknown sequence {name!r}; expected one of {', '.join(SEQUENCES)}")
    return SEQUENCES.index(key)


def available(code: int) -> list[int]:
    """Sequence indices available under a 4-bit code (t1 t1ce t2 flair, most significant first).

    >>> available(0b1010)
    [0, 2]
    """
    if code not in CODES:
        raise ValueError(f"availability code {code} not in 1..{CODES[-1]}")
    return [i for i in range(N_SEQ) if code >> (N_SEQ - 1 - i) & 1]


def missing(code: int) -> list[int]:
    """Sequence indices missing under a 4-bit availability code."""
    have = set(available(code))
    return [i for i in range(N_SEQ) if i not in have]


def train_pair(code: int) -> tuple[int, int]:
    """The two neighbouring sequences a training subject keeps in the "missing" setting (n mod 3)."""
    return TRAIN_PAIRS[code % 3]


def path_name(path) -> str:
    """A multi-step path like (0, 1, 2) written as in result CSVs: '0>1>2'."""
    return ">".join(str(i) for i in path)
