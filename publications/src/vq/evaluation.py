"""The paper's evaluation protocol (docs/method.md, "Evaluation protocol") and its summary tables.

For each test subject: every available source x every missing target, single
step and through configured multi-step paths, plus a "copy the source"
baseline. PSNR/SSIM use data range 2 on the whole [-1, 1] stack; `lpips` is the
per-volume SUM of per-slice LPIPS (the reference's table numbers),
`lpips_mean` the per-slice mean.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vq.files import write_atomic
from vq.metrics import LPIPSMetric, lpips_volume, psnr, ssim3d
from vq.runtime import autocast
from vq.sequences import DISPLAY_NAMES, SEQUENCES, available, missing, path_name, seq_index

METRIC_COLUMNS = ["name", "src", "tgt", "psnr", "ssim", "lpips", "steps", "lpips_mean"]
"""result_metrics.csv: the reference's six columns first, then ours."""
SUMMARY_COLUMNS = ["method", "steps", "src", "tgt", "n", "psnr", "psnr_std", "ssim", "ssim_std", "lpips", "lpips_std"]


class Translator:
    """Batched inference over stacks of slices (S,1,H,W) in [-1,1], on one device."""

    def __init__(self, model: nn.Module, device: torch.device, amp: torch.dtype | None, batch_size: int):
        self.model, self.device, self.amp, self.batch_size = model.eval(), device, amp, batch_size

    @torch.no_grad()
    def encode(self, stack: torch.Tensor) -> torch.Tensor:
        """(S,1,H,W) -> latent (S,D,H/4,W/4), fp32, on the device."""
        out = []
        for chunk in stack.split(self.batch_size):
            with autocast(self.device, self.amp):
                out.append(self.model.encode(chunk.to(self.device)).latent.float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, target) -> torch.Tensor:
        """latent (S,D,h,w) -> (S,1,H,W) fp32; target: a sequence index or a (code_dim,) code vector."""
        out = []
        for chunk in latent.split(self.batch_size):
            code = target if isinstance(target, int) else target.expand(chunk.shape[0], -1)
            with autocast(self.device, self.amp):
                out.append(self.model.decode(chunk, code).float())
        return torch.cat(out)

    def translate(self, stack: torch.Tensor, path: list[int], memo: dict | None = None) -> torch.Tensor:
        """Translate along a path of sequence indices: [s, t] single step, [s, m, ..., t] multi-step.

        `memo`: a dict shared by the translations of one subject, so that the latent of
        each stack and the stacks along shared path prefixes are computed once (the
        source is encoded once for all its targets; T1 -> T1Gd -> T2 reuses T1 -> T1Gd).
        """
        memo = {} if memo is None else memo
        current = stack
        for k in range(1, len(path)):
            step = tuple(path[:k + 1])
            if step not in memo:
                source = ("latent", *path[:k])
                if source not in memo:
                    memo[source] = self.encode(current)
                memo[step] = self.decode(memo[source], path[k])
            current = memo[step]
        return current


@dataclass
class Translation:
    """One evaluated translation: a source, a target, the path between them."""

    src: int
    tgt: int
    path: list[int]

    @property
    def steps(self) -> str:
        return path_name(self.path)

    @property
    def multi(self) -> bool:
        return len(self.path) > 2


def translations_for(code: int, multi_step: list[list[str]]) -> list[Translation]:
    """Every available source x missing target (single step), plus each configured multi-step path
    whose first sequence is available and whose last one is missing."""
    have, lack = available(code), missing(code)
    out = [Translation(s, t, [s, t]) for s in have for t in lack]
    for names in multi_step:
        path = [seq_index(n) for n in names]
        if path[0] in have and path[-1] in lack:
            out.append(Translation(path[0], path[-1], path))
    return out


def score(pred: torch.Tensor, target: torch.Tensor, lpips: LPIPSMetric | None) -> dict[str, float]:
    """PSNR/SSIM (data range 2) on the whole stack; LPIPS per slice, summed and averaged."""
    pred, target = pred[:, 0], target[:, 0]  # (S,1,H,W) -> (S,H,W): one 3D stack, one value per metric
    row = {"psnr": float(psnr(pred, target)), "ssim": ssim3d(pred.cpu().numpy(), target.cpu().numpy()),
           "lpips": math.nan, "lpips_mean": math.nan}
    if lpips is not None:
        row["lpips"], row["lpips_mean"] = lpips_volume(lpips, pred, target)
    return row


def write_metrics(rows: list[dict], path: str | Path, columns: list[str] = METRIC_COLUMNS) -> Path:
    """A metrics CSV (result_metrics.csv by default), written atomically; NaN (LPIPS unavailable)
    becomes an empty cell."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else
                         (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_atomic(path, lambda f: f.write(text.getvalue().encode()))


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std per (method, single/multiple, src, tgt) over subjects."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        steps = "multiple" if row["steps"].count(">") > 1 else "single"
        groups[(row["method"], steps, row["src"], row["tgt"])].append(row)
    out = []
    for (method, steps, src, tgt), members in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "model", kv[0][1] != "single", SEQUENCES.index(kv[0][2]), SEQUENCES.index(kv[0][3]))):
        entry = {"method": method, "steps": steps, "src": src, "tgt": tgt, "n": len(members)}
        for key in ("psnr", "ssim", "lpips"):
            values = np.array([m[key] for m in members], dtype=float)
            values = values[~np.isnan(values)]
            entry[key] = float(values.mean()) if values.size else math.nan
            entry[f"{key}_std"] = float(values.std()) if values.size else math.nan
        out.append(entry)
    return out


def write_summary(summary: list[dict], csv_path: str | Path, md_path: str | Path) -> None:
    """summary.csv and summary.md, each written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_COLUMNS)
    writer.writeheader()
    for entry in summary:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else
                             "" if isinstance(v, float) else v) for k, v in entry.items()})
    write_atomic(csv_path, lambda f: f.write(text.getvalue().encode()))
    write_atomic(md_path, lambda f: f.write(summary_markdown(summary).encode()))


def summary_markdown(summary: list[dict]) -> str:
    """Laid out like the paper's Table 1: a row per (steps, method), a column per translation."""
    pairs = sorted({(e["src"], e["tgt"]) for e in summary},
                   key=lambda p: (SEQUENCES.index(p[0]), SEQUENCES.index(p[1])))
    rows = sorted({(e["steps"], e["method"]) for e in summary}, key=lambda r: (r[0] != "single", r[1] != "model"))
    cell = {(e["steps"], e["method"], e["src"], e["tgt"]): e for e in summary}
    head = ["step", "method"] + [f"{DISPLAY_NAMES[s]}->{DISPLAY_NAMES[t]} PSNR / SSIM / LPIPS" for s, t in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for steps, method in rows:
        values = []
        for s, t in pairs:
            e = cell.get((steps, method, s, t))
            if e is None:
                values.append("-")
                continue
            lp = "n/a" if math.isnan(e["lpips"]) else f"{e['lpips']:.2f}"
            values.append(f"{e['psnr']:.1f} / {e['ssim']:.3f} / {lp} (n={e['n']})")
        lines.append(f"| {steps} | {method} | " + " | ".join(values) + " |")
    note = ("\nMeans over test subjects. PSNR and SSIM with data range 2 on the 128x192x192 stack in [-1, 1]; "
            "LPIPS is the per-volume SUM over slices (AlexNet, v0.1), as in the paper's Table 1; "
            "`lpips_mean` in result_metrics.csv is the per-slice mean. `copy_source` scores the source "
            "image itself as the prediction.\n")
    return "\n".join(lines) + "\n" + note
