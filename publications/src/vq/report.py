"""Reading evaluated runs: the model against copying the source, the demo's goal, quality against minutes.

A run folder (`out_dir`) holds `log.csv` (training rows; `elapsed_s` is the wall time since the run
started) and `config.yaml`; its evaluation folder holds `summary.csv` (`vq.evaluation.write_summary`).
`tools/demo_curve.py` turns several such runs into docs/results.md's table and curve.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from vq.sequences import DISPLAY_NAMES, SEQUENCES

GOAL_CONTRAST_ERROR = 0.15
"""The demo's bar for "small" (mean |predicted - real| tissue/WM intensity ratio over the phantom's
tissues); the copy of a source with another contrast scores 0.3 to 1.5 on it."""


def _float(text: str | None) -> float:
    return float(text) if text not in (None, "") else math.nan


def read_summary(path: str | Path) -> list[dict]:
    """summary.csv -> rows with numbers as floats."""
    with open(path, newline="") as f:
        return [{k: (v if k in ("method", "steps", "src", "tgt") else _float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


@dataclass
class Comparison:
    """One single-step translation: the model's brain-region scores next to copying the source."""

    src: str
    tgt: str
    psnr_brain: float
    copy_psnr_brain: float
    ssim_brain: float
    copy_ssim_brain: float
    contrast_error: float
    copy_contrast_error: float
    tissue_order: float
    """Share of test subjects whose tissues sort by intensity as in the real target."""
    psnr: float = math.nan
    """Whole-image PSNR (the paper's), model and copy."""
    copy_psnr: float = math.nan

    @property
    def name(self) -> str:
        return f"{DISPLAY_NAMES[self.src]} -> {DISPLAY_NAMES[self.tgt]}"

    @property
    def meets_goal(self) -> bool:
        """The demo's goal for one translation: brain and whole-image PSNR above the copy, the real
        tissue order in every subject, contrast error under GOAL_CONTRAST_ERROR."""
        return (self.psnr_brain > self.copy_psnr_brain and self.psnr > self.copy_psnr
                and self.tissue_order == 1.0 and self.contrast_error < GOAL_CONTRAST_ERROR)


def compare_with_copy(summary: list[dict]) -> list[Comparison]:
    """The single-step translations of a summary, model against copy, in Table 1's order."""
    cell = {(r["method"], r["src"], r["tgt"]): r for r in summary if r["steps"] == "single"}
    out = []
    for (method, src, tgt), model in cell.items():
        copy = cell.get(("copy_source", src, tgt))
        if method != "model" or copy is None:
            continue
        out.append(Comparison(src, tgt, model["psnr_brain"], copy["psnr_brain"], model["ssim_brain"],
                              copy["ssim_brain"], model["contrast_error"], copy["contrast_error"],
                              model["tissue_order"], model["psnr"], copy["psnr"]))
    return sorted(out, key=lambda c: (SEQUENCES.index(c.src), SEQUENCES.index(c.tgt)))


def goal_row(comparisons: list[Comparison]) -> dict:
    """Means over the single-step translations and how many meet each part of the goal."""
    n = len(comparisons)
    mean = lambda key: sum(getattr(c, key) for c in comparisons) / max(n, 1)
    return {"translations": n,
            "psnr_brain": mean("psnr_brain"), "copy_psnr_brain": mean("copy_psnr_brain"),
            "ssim_brain": mean("ssim_brain"), "copy_ssim_brain": mean("copy_ssim_brain"),
            "contrast_error": mean("contrast_error"), "copy_contrast_error": mean("copy_contrast_error"),
            "tissue_order": mean("tissue_order"),
            "psnr": mean("psnr"), "copy_psnr": mean("copy_psnr"),
            "beats_copy_psnr": sum(c.psnr_brain > c.copy_psnr_brain for c in comparisons),
            "beats_copy_psnr_whole": sum(c.psnr > c.copy_psnr for c in comparisons),
            "beats_copy_ssim": sum(c.ssim_brain > c.copy_ssim_brain for c in comparisons),
            "order_kept": sum(c.tissue_order == 1.0 for c in comparisons),
            "small_contrast_error": sum(c.contrast_error < GOAL_CONTRAST_ERROR for c in comparisons),
            "meets_goal": sum(c.meets_goal for c in comparisons)}


def training_minutes(log_csv: str | Path) -> tuple[int, float]:
    """(steps, wall minutes) of a run from its log.csv: the last row's step and `elapsed_s`
    (NaN minutes for a log written before the column existed)."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return 0, math.nan
    return int(float(rows[-1]["step"])), _float(rows[-1].get("elapsed_s")) / 60


def validation_curve(log_csv: str | Path) -> list[tuple[int, float, float]]:
    """(step, minutes, validation brain PSNR) of every validation row of a log.csv."""
    with open(log_csv, newline="") as f:
        return [(int(float(r["step"])), _float(r.get("elapsed_s")) / 60, _float(r["val_psnr_brain"]))
                for r in csv.DictReader(f) if r.get("val_psnr_brain") not in (None, "")]
