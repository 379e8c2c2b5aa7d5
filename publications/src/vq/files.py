"""Atomic file writes: a reader (or a run killed mid-write) never sees half a file."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


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
