"""Up-front data checks: every subject a run will use, before its first step.

A subject is checked for what its consumer reads: a training subject for the two
sequences it trains on (or all four outside the "missing" setting), a validation
or test subject for all four. The checks are the slice cache's (`SliceCache.check`):
the folder and files exist, each file is a readable 3D NIfTI that is finite and not
all zeros, and the sequences agree in shape. Checking also builds the cache, so a
run that passes starts at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from vq.config import Config, resolve_path
from vq.dataloader.brats import BratsDataError, SliceCache, summarize_bad
from vq.dataloader.lists import read_list
from vq.dataloader.datasets import train_sequences
from vq.files import write_csv
from vq.sequences import SEQUENCES

REPORT_COLUMNS = ["list", "subject", "code", "status", "reason"]


@dataclass
class DataCheck:
    """The outcome of `check_lists`: per list, each row (name, code) and its problem (None = usable)."""

    rows: dict[str, list[tuple[str, int, str | None]]] = field(default_factory=dict)

    @property
    def bad(self) -> dict[str, str]:
        """{"list/subject": reason} of every unusable row."""
        return {f"{name} ({lst})": why for lst, rows in self.rows.items() for name, _, why in rows if why}

    @property
    def n_rows(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def used(self, lst: str) -> list[tuple[str, int]]:
        """The usable (name, code) rows of one list."""
        return [(name, code) for name, code, why in self.rows.get(lst, []) if why is None]

    def summary(self, report: Path | None = None) -> str:
        """One line: how many subjects are bad, the first few and why, where the full list is."""
        return summarize_bad(self.bad, self.n_rows, report)

    def table(self) -> str:
        """A markdown table: per list, subjects, usable, bad."""
        lines = ["| list | subjects | usable | bad |", "|---|---|---|---|"]
        for lst, rows in self.rows.items():
            n_bad = sum(why is not None for _, _, why in rows)
            lines.append(f"| {lst} | {len(rows)} | {len(rows) - n_bad} | {n_bad} |")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        """The per-subject report as CSV (list, subject, code, status, reason), written atomically."""
        return write_csv(path, [dict(zip(REPORT_COLUMNS, (lst, name, code, "ok" if why is None else "bad", why or "")))
                                for lst, rows in self.rows.items() for name, code, why in rows], REPORT_COLUMNS)


def needed_sequences(lst: str, code: int, missing: bool) -> tuple[str, ...]:
    """The sequences a subject of list `lst` is read for."""
    if lst == "train":
        return tuple(SEQUENCES[i] for i in train_sequences(code, missing))
    return SEQUENCES


def check_lists(cache: SliceCache, lists: dict[str, list[tuple[str, int]]], missing: bool = True) -> DataCheck:
    """Check (and cache) every subject of the given lists, e.g. {"train": rows, "valid": rows}."""
    result = DataCheck()
    for lst, rows in lists.items():
        wanted = {name: needed_sequences(lst, code, missing) for name, code in rows}
        _, bad = cache.check(wanted)
        result.rows[lst] = [(name, code, bad.get(name)) for name, code in rows]
    return result


def check_training_data(cfg: Config, run_dir: Path, write_report: bool = True) -> tuple[SliceCache, list, list]:
    """Check every training and validation subject (and build their slice cache) before a run starts;
    -> (cache, usable train rows, usable valid rows).

    Bad subjects stop the run with one line (how many, the first few, the report file in the run
    folder), unless data.skip_bad leaves them out. Under torchrun the processes take turns on the
    cache's lock: the first builds, the others find the cache ready; one (`write_report`) writes the report.
    """
    lists = cfg.lists_dir
    rows = {"train": read_list(lists / "train.csv"), "valid": read_list(lists / "valid.csv")}
    cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
    with cache.locked():
        result = check_lists(cache, rows, cfg.data.missing)
    if result.bad:
        report = run_dir / "bad_subjects.csv"
        if write_report:
            result.write(report)
        if not cfg.data.skip_bad:
            raise BratsDataError(f"{result.summary(report)}; fix them, or train without them with "
                                 "--set data.skip_bad=true")
        logging.getLogger("train").warning("data.skip_bad: training without them: %s", result.summary(report))
    train_rows, valid_rows = result.used("train"), result.used("valid")
    if not train_rows or not valid_rows:
        raise BratsDataError(f"no usable {'training' if not train_rows else 'validation'} subjects "
                             f"in {lists}; see {run_dir / 'bad_subjects.csv'}")
    return cache, train_rows, valid_rows
