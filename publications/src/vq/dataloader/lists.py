"""Data lists: CSV rows `<ID>,<n>`, n in 1..14 the availability code (see `vq.sequences`).

The same format as the reference's lists, so lists written for it work here and
the other way round. Problems are reported with the file and line.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

from vq.sequences import CODES

SPLITS = ("train", "valid", "test")
PAPER_SPLIT = (830, 93, 328)
"""BraTS2021 split of the paper: 830 train / 93 valid / 328 test of 1251 subjects."""


class DataListError(ValueError):
    """A data list that cannot be used, with file and line in the message."""


def read_list(path: str | Path) -> list[tuple[str, int]]:
    """Read a data list; check codes are 1..14 and names are unique."""
    path = Path(path)
    if not path.is_file():
        raise DataListError(f"data list {path} not found")
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise DataListError(f"{path}:{lineno}: expected '<ID>,<code>', got {','.join(row)!r}")
            name, text = row[0].strip(), row[1].strip()
            try:
                code = int(text)
            except ValueError:
                raise DataListError(f"{path}:{lineno}: code {text!r} of {name} is not an integer") from None
            if code not in CODES:
                raise DataListError(f"{path}:{lineno}: code {code} of {name} not in 1..{CODES[-1]}")
            if name in seen:
                raise DataListError(f"{path}:{lineno}: subject {name} listed twice")
            seen.add(name)
            rows.append((name, code))
    if not rows:
        raise DataListError(f"data list {path} is empty")
    return rows


def write_list(path: str | Path, rows: list[tuple[str, int]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def spread_codes(n: int, rng: random.Random) -> list[int]:
    """n availability codes with the 14 patterns spread evenly (counts differ by at most one).

    Whole rounds of all patterns, then a random choice of distinct patterns for the
    rest: a split smaller than 14 gets a random mix, not always codes 1..n (which
    would never make T1 available, as codes below 8 have no T1).
    """
    patterns = list(CODES)
    codes = patterns * (n // len(patterns)) + rng.sample(patterns, n % len(patterns))
    rng.shuffle(codes)
    return codes


def split_sizes(n: int, proportions=PAPER_SPLIT) -> tuple[int, int, int]:
    """Split n subjects in the paper's proportions; valid and test get at least one when n >= 3."""
    total = sum(proportions)
    n_valid = max(1, round(n * proportions[1] / total)) if n >= 3 else 0
    n_test = max(1, round(n * proportions[2] / total)) if n >= 3 else 0
    return n - n_valid - n_test, n_valid, n_test


def make_lists(names: list[str], out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Shuffle subjects, split in the paper's proportions, write train/valid/test CSVs."""
    rng = random.Random(seed)
    names = sorted(names)
    rng.shuffle(names)
    sizes = split_sizes(len(names))
    out, start = {}, 0
    for split, size in zip(SPLITS, sizes):
        part = sorted(names[start:start + size])
        start += size
        out[split] = write_list(Path(out_dir) / f"{split}.csv", list(zip(part, spread_codes(len(part), rng))))
    return out
