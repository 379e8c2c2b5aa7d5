"""What a training run writes as it goes: config.yaml, log.csv, TensorBoard events, the sample grids and
progress.png.

Only the main process writes; on the others `RunLog(..., active=False)` takes every call and does nothing.
A resumed run appends to its log.csv with the columns it started with; rows logged after the checkpoint
it resumes from (a hard kill) are dropped first, so that every step is logged once.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

from vq.config import Config, save_config
from vq.files import write_csv
from vq.viz import plot_progress, save_png

log = logging.getLogger("train")
LOG_COLUMNS = ["step", "epoch", "lr", "loss", "l1", "ssim", "per", "vq", "con", "perplexity", "usage",
               "slices_per_s", "data_wait_share", "val_psnr", "val_psnr_brain", "val_latent_gap", "skipped", "elapsed_s"]
"""log.csv's columns: a row per `train.log_every` steps (the training statistics) and one per validation."""


class RunLog:
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None = None, active: bool = True):
        self.run_dir, self.active, self.started = run_dir, active, time.perf_counter()
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        self.path = run_dir / "log.csv"
        self.writer = SummaryWriter(run_dir / "tensorboard", purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is not None and self.path.exists():
            drop_rows_after(self.path, resume_step)
        new = not self.path.exists()
        columns = LOG_COLUMNS if new else read_columns(self.path)  # a resumed run keeps its columns
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, columns, extrasaction="ignore")
        if new:
            self.csv.writeheader()

    def record(self, step: int, row: dict, scalars: dict[str, float] | None = None) -> None:
        """A log.csv row (with `elapsed_s`, the wall seconds of this process's training) and TensorBoard scalars."""
        if self.active:
            self.csv.writerow({"step": step, **row, "elapsed_s": round(time.perf_counter() - self.started, 1)})
            for key, value in (scalars or {}).items():
                self.writer.add_scalar(key, value, step)

    def samples(self, grid: np.ndarray, epoch: int, step: int) -> None:
        """A sample grid: samples/epoch_NNNN.png and TensorBoard's valid/samples."""
        if self.active:
            save_png(grid, self.run_dir / "samples" / f"epoch_{epoch:04d}.png")
            self.writer.add_image("valid/samples", grid, step, dataformats="HWC")

    def flush(self) -> None:
        """At an epoch's end: log.csv to disk and progress.png redrawn from it."""
        if self.active:
            self.file.flush()
            plot_progress(self.path, self.run_dir / "progress.png")

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.writer.close()


class DataWait:
    """The batches of a loader, timing how long the loop waited for each (the time spent in `next`)."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        tic = time.perf_counter()
        batches = iter(self.loader)  # starting the workers: waited for too
        while True:
            batch = next(batches, None)
            self.seconds += time.perf_counter() - tic
            if batch is None:
                return
            yield batch
            tic = time.perf_counter()

    def take(self) -> float:
        """Seconds waited since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def read_columns(log_path: Path) -> list[str]:
    with log_path.open() as f:
        return f.readline().strip().split(",")


def drop_rows_after(log_path: Path, step: int) -> None:
    """Keep the log.csv rows up to `step`, under the file's own header (rewritten atomically)."""
    with log_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or LOG_COLUMNS
    kept = [row for row in rows if int(row["step"]) <= step]
    if len(kept) < len(rows):
        write_csv(log_path, kept, columns)
        log.info("log.csv: dropped %d rows logged after step %d, the checkpoint's", len(rows) - len(kept), step)
