"""Atomic file writes: a reader (or a run killed mid-write) never sees half a file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = False) -> Path:
    """Call write(f) on a temporary file in path's folder, then rename it to path.

    The file gets the mode a plain open() would give (0o666 minus the umask), not
    mkstemp's 0o600, so caches and run folders can be shared by a group.
    `durable`: fsync before the rename (checkpoints), so a power cut keeps old or new.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
