"""Atomic file writes: a reader (or a run killed mid-write) never sees half a file."""
from __future__ import annotations

import csv
import io
import math
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = False) -> Path:
    """Call write(f) on a temporary file in path's folder, then rename it to path.

    The temporary file is created as open() would create it (mode 0o666, less the
    umask), not with mkstemp's 0o600, so caches and run folders can be shared by a group.
    `durable`: fsync before the rename (checkpoints), so a power cut keeps old or new.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_csv(path: str | Path, rows: Iterable[dict], columns: list[str] | None = None, digits: int = 6) -> Path:
    """A CSV of dict rows under a header, written atomically (every results table of the project, for
    pandas and spreadsheets alike). columns: default the first row's keys; keys not in them are left out.
    Floats keep `digits` significant digits; NaN (a score that could not be computed) is an empty cell."""
    rows = list(rows)
    columns = columns or list(rows[0] if rows else [])
    cell = lambda v: ("" if math.isnan(v) else f"{v:.{digits}g}") if isinstance(v, float) else v  # noqa: E731
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: cell(v) for k, v in row.items()} for row in rows)
    return write_atomic(path, lambda f: f.write(text.getvalue().encode()))
