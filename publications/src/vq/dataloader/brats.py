"""BraTS-layout subjects and the preprocessed slice cache.

Layout (docs/method.md, "Data protocol"): `<root>/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz`, or with
`data.naming: brasyn` BraSyn's `<root>/<ID>/<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz` (`vq.sequences.subject_file`).

Training reads one random axial slice at a time. Decompressing a 240x240x155
`.nii.gz` for each slice would cost ~100x more than the slice, so each
(subject, sequence) is normalised once and its central `n_slices` axial slices
are stored as a float16 `.npy` of shape (n_slices, X, Y): a slice is then one
contiguous read from a memory map. float16 keeps [-1, 1] images to within 2.4e-4
(half a float16 step near 1), far below what PSNR can see (~70 dB); `data.cache_dtype:
float32` stores the reference's float32 values at twice the disk space.

Each subject folder of the cache has a `manifest.json` recording the source
files (path, size, mtime, a content fingerprint, volume shape) and the
preprocessing settings. An entry whose source or settings changed (a file
replaced by another of the same size and mtime, as `cp -p` does, changes the
fingerprint), whose `.npy` is missing or truncated, or whose subject has no
manifest is rebuilt, never used. A (re)build removes
the subject's manifest before it writes any `.npy` and writes a new one last,
so an interrupted build leaves no manifest. Each dataset root and set of
preprocessing settings has a cache folder of its own: runs with different
settings never rewrite each other's files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # not on POSIX
    fcntl = None

from vq import nifti
from vq.config import DataConfig
from vq.dataloader.preprocess import Preprocessing, central_slices, normalize
from vq.files import write_atomic
from vq.sequences import NAMINGS, SEG, SEQUENCES, find_subject_file, seq_index, subject_file

log = logging.getLogger(__name__)

FILE_KINDS: tuple[str, ...] = SEQUENCES + (SEG,)
CACHE_FORMAT = 3
"""Version of the cache layout (file names, manifest fields)."""
FINGERPRINT_CHUNK = 1 << 16
"""Bytes read at each of the start, middle and end of a source file for its fingerprint."""
MANIFEST = "manifest.json"


class BratsDataError(ValueError):
    """A subject that cannot be used; the message names the subject and the file."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fingerprint(path: Path) -> str:
    """A cheap content fingerprint of a file: SHA-1 of its size and of 64 KiB at its start (the
    NIfTI header), middle and end (a .nii.gz ends with the gzip trailer, the CRC-32 of all its data)."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with path.open("rb") as f:
        for offset in sorted({0, max(size // 2 - FINGERPRINT_CHUNK // 2, 0), max(size - FINGERPRINT_CHUNK, 0)}):
            f.seek(offset)
            digest.update(f.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()


def summarize_bad(bad: Mapping[str, str], of: int, report: Path | None = None, shown: int = 3) -> str:
    """One line for a set of bad subjects: how many, the first few with their reason, where the rest is."""
    first = "; ".join(list(bad.values())[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    where = f" (all listed in {report})" if report else ""
    return f"{len(bad)} of {of} subjects unusable{where}: {first}{more}"


def _kind(kind: str | int) -> str:
    return SEG if kind == SEG else SEQUENCES[seq_index(kind)]


def subject_files(root: str | Path, name: str, kinds: Iterable[str | int] = FILE_KINDS,
                  naming: str = "brats2021") -> dict[str, Path]:
    """Paths of a subject's files by kind (`t1` ... `seg`); `.nii.gz`, or `.nii` if only that exists."""
    folder = Path(root) / name
    if not folder.is_dir():
        raise BratsDataError(f"subject {name}: folder {folder} not found")
    files, missing = {}, []
    for kind in map(_kind, kinds):
        if path := find_subject_file(folder, kind, [naming]):
            files[kind] = path
        else:
            missing.append(str(folder / subject_file(name, kind, naming)))
    if missing:
        other = next((n for n in NAMINGS if n != naming and (folder / subject_file(name, SEQUENCES[0], n)).is_file()), None)
        hint = f" (the folder's files are named as in {other}: set data.naming: {other})" if other else ""
        raise BratsDataError(f"subject {name}: missing file {', '.join(missing)}{hint}")
    return files


def _read(path: Path, name: str, percentile: float, n_slices: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """One sequence: load, normalise the whole volume, keep the central slices.

    -> ((X, Y, n_slices) float32, the whole volume's shape (X, Y, Z)).
    """
    try:
        data = nifti.load_volume(path).data  # (X, Y, Z) RAS+, checked finite and non-zero
        return normalize(data, percentile)[:, :, central_slices(data.shape[-1], n_slices)], data.shape
    except (nifti.NiftiError, ValueError) as err:
        raise BratsDataError(f"subject {name}: {err if str(path) in str(err) else f'{path}: {err}'}") from None


def _check_shapes(name: str, shapes: Mapping[str, tuple]) -> None:
    """shapes: file name -> whole-volume shape; all must agree (same depth too, or the
    central slices of two sequences would be different anatomy)."""
    if len(set(map(tuple, shapes.values()))) > 1:
        listing = ", ".join(f"{file} {tuple(shape)}" for file, shape in shapes.items())
        raise BratsDataError(f"subject {name}: volumes differ in shape: {listing}")


def load_subject(root: str | Path, name: str, seqs: Iterable[str | int] = SEQUENCES,
                 percentile: float = 99.0, n_slices: int = 128, naming: str = "brats2021") -> np.ndarray:
    """Normalised central slices of a subject's sequences -> (n_seq, X, Y, n_slices) float32."""
    files = subject_files(root, name, seqs, naming)
    volumes = {path.name: _read(path, name, percentile, n_slices) for path in files.values()}
    _check_shapes(name, {file: shape for file, (_, shape) in volumes.items()})
    return np.stack([slices for slices, _ in volumes.values()])


def _build(job: tuple[str, dict[str, Path], Path, float, int, str]) -> tuple[str, dict, str | None]:
    """Build the cache files of one subject (runs in a worker process). -> (name, entries, error)."""
    name, todo, folder, percentile, n_slices, dtype = job
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # before any .npy changes: an interrupted build is never trusted
    entries = {}
    try:
        for seq, src in todo.items():
            stat = src.stat()  # taken before reading: a change during the build shows as stale next time
            content_id = fingerprint(src)
            slices, volume_shape = _read(src, name, percentile, n_slices)
            slices = np.ascontiguousarray(np.moveaxis(slices, -1, 0), dtype=dtype)  # (X, Y, n) -> (n, X, Y)
            npy = folder / f"{seq}.npy"
            write_atomic(npy, lambda f: np.save(f, slices))
            entries[seq] = {"source": str(src), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                            "fingerprint": content_id, "volume_shape": list(volume_shape), "shape": list(slices.shape),
                            "npy_bytes": npy.stat().st_size}
    except BratsDataError as err:
        return name, entries, str(err)
    return name, entries, None


class SliceCache:
    """Normalised central axial slices of BraTS subjects as float16 memory maps, built on demand.

    `ensure(subjects)` checks and (re)builds; `volume(name, seq)` then gives a
    read-only (n_slices, X, Y) float16 memory map. The cache of `root` lives in
    `cache_dir/<root name>-<hash of root path and settings>`, so two datasets, or two
    preprocessing settings of one dataset, never share entries.
    """

    def __init__(self, cache_dir: str | Path, root: str | Path, cfg: DataConfig | Preprocessing,
                 workers: int | None = None):
        self.root = Path(root).resolve()
        self.prep = cfg if isinstance(cfg, Preprocessing) else Preprocessing.from_config(cfg)
        self.naming = "brats2021" if isinstance(cfg, Preprocessing) else cfg.naming
        key = json.dumps({"root": str(self.root), **self.prep.cache_key()}, sort_keys=True)
        tag = hashlib.sha1(key.encode()).hexdigest()[:8]
        self.dir = Path(cache_dir) / f"{self.root.name}-{tag}"
        # building is gzip-decompression bound: one process per core, capped to bound memory (~0.2 GB each)
        self.workers = min(8, available_cpus()) if workers is None else workers

    def path(self, name: str, seq: str | int) -> Path:
        return self.dir / name / f"{_kind(seq)}.npy"

    def volume(self, name: str, seq: str | int) -> np.ndarray:
        """(n_slices, X, Y) float16, read-only memory map of an ensured subject."""
        try:
            return np.load(self.path(name, seq), mmap_mode="r")
        except FileNotFoundError:
            raise BratsDataError(f"subject {name}: {_kind(seq)} is not in the slice cache {self.dir}; "
                                 "call SliceCache.ensure first") from None

    def _manifest(self, name: str) -> dict | None:
        """The subject's manifest if it exists, parses and has this format and these settings."""
        try:
            manifest = json.loads((self.dir / name / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("format") != CACHE_FORMAT or manifest.get("settings") != self.prep.cache_key():
            return None
        return manifest

    def _stale(self, manifest: dict | None, name: str, seq: str, src: Path) -> str | None:
        """Why the cached (name, seq) cannot be used, or None if it can."""
        if manifest is None:
            if not (self.dir / name).exists():
                return "not cached"
            return "no valid manifest (interrupted build or changed settings)"
        entry = manifest["sequences"].get(seq)
        if entry is None:
            return "not cached"
        if not src.is_file():
            return f"source {src} missing"
        stat = src.stat()
        if (entry["source"], entry["size"], entry["mtime_ns"]) != (str(src), stat.st_size, stat.st_mtime_ns):
            return f"source {src} changed"
        if entry["fingerprint"] != fingerprint(src):
            return f"source {src} replaced (same size and time, other content)"
        npy = self.path(name, seq)
        if not npy.is_file() or npy.stat().st_size != entry["npy_bytes"]:
            return f"{npy.name} missing or truncated"
        return None

    def ensure(self, subjects: Iterable[str] | Mapping[str, Iterable[str | int]],
               skip_bad: bool = False) -> list[str]:
        """Make sure the subjects' slices are cached and current; return the usable subject names.

        `subjects`: names (all four sequences) or {name: sequences}. A subject with a missing,
        unreadable, empty or NaN file raises BratsDataError (one line naming the subjects and
        files), or with `skip_bad` is logged and left out.
        """
        good, bad = self.check(subjects)
        if bad and not skip_bad:
            raise BratsDataError(summarize_bad(bad, len(good) + len(bad)))
        for message in bad.values():
            log.warning("skipping %s", message)
        return good

    def check(self, subjects: Iterable[str] | Mapping[str, Iterable[str | int]]) -> tuple[list[str], dict[str, str]]:
        """Check, and cache where needed, the subjects' files: -> (usable names, {bad name: reason}).

        A subject is bad when its folder or a file is missing, a file is not a readable 3D NIfTI,
        is all zeros or holds NaN/Inf, or its sequences differ in shape.
        """
        wanted = dict(subjects) if isinstance(subjects, Mapping) else {name: SEQUENCES for name in subjects}
        wanted = {name: [_kind(s) for s in seqs] for name, seqs in wanted.items()}
        bad: dict[str, str] = {}
        jobs, kept = [], {}
        for name, seqs in wanted.items():
            try:
                files = subject_files(self.root, name, seqs, self.naming)
            except BratsDataError as err:
                bad[name] = str(err)
                continue
            manifest = self._manifest(name)
            # every recorded entry is checked, requested or not: a manifest only lists usable entries
            sources = {seq: Path(e["source"]) for seq, e in manifest["sequences"].items()} if manifest else {}
            status = {seq: self._stale(manifest, name, seq, src) for seq, src in {**sources, **files}.items()}
            kept[name] = {seq: manifest["sequences"][seq] for seq, why in status.items() if why is None}
            todo = {seq: files[seq] for seq in seqs if status[seq]}
            for seq in todo:
                if status[seq] != "not cached":
                    log.info("slice cache: rebuilding %s %s: %s", name, seq, status[seq])
            if todo:
                jobs.append((name, todo, self.dir / name, self.prep.percentile, self.prep.n_slices,
                             self.prep.cache_dtype))

        if jobs:
            log.info("slice cache %s: building %d of %d subjects", self.dir, len(jobs), len(wanted))
            self._run(jobs, kept, bad)
        return [name for name in wanted if name not in bad], {name: bad[name] for name in wanted if name in bad}

    @contextlib.contextmanager
    def locked(self):
        """Hold the cache folder's lock (an exclusive flock): the processes of a torchrun job build
        the cache one after the other, so the first builds it and the others find it ready, with
        no collective waiting on the build. A no-op where flock is missing."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, jobs: list, kept: dict, bad: dict) -> None:
        """Build `jobs` (in worker processes if several), then check shapes and write manifests."""
        built = []
        pool = None
        if self.workers > 1 and len(jobs) > 1:  # spawn: no forked copies of the caller's threads
            pool = ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
        try:
            results = pool.map(_build, jobs) if pool else map(_build, jobs)
            for name, entries, error in tqdm(results, total=len(jobs), desc="slice cache", unit="subject"):
                if error:
                    bad[name] = error
                    continue
                entries = {**kept[name], **entries}
                try:
                    _check_shapes(name, {Path(e["source"]).name: e["volume_shape"] for e in entries.values()})
                except BratsDataError as err:
                    bad[name] = str(err)
                    continue
                manifest = {"format": CACHE_FORMAT, "subject": name, "settings": self.prep.cache_key(),
                            "sequences": entries}
                text = json.dumps(manifest, indent=1).encode()
                write_atomic(self.dir / name / MANIFEST, lambda f: f.write(text))  # last: marks it complete
                built.append(name)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        if built:
            shown = ", ".join(built[:10]) + (f", ... ({len(built)} in all)" if len(built) > 10 else "")
            log.info("slice cache: built %s", shown)
