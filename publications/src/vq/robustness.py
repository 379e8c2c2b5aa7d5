"""Anti-interference (docs/method.md, "Claims of the paper beyond Table 1"): translate corrupted sources,
score the translations against the CLEAN targets.

For each subject, every available source x every missing target (single step), the source is corrupted
by each kind of `vq.corruptions.CORRUPTIONS` at levels 1..3 (level 0: clean). Every compared model sees
the very same corrupted inputs.
"""
from __future__ import annotations

import logging
import math
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vq.config import Config
from vq.corruptions import CORRUPTIONS, corrupt
from vq.dataloader.datasets import load_eval_stack
from vq.evaluation import TestRun, score, write_metrics
from vq.inference import Translator
from vq.metrics import LPIPSMetric, psnr
from vq.sequences import N_SEQ, SEQUENCES, available, missing
from vq.viz import robustness_plot

log = logging.getLogger(__name__)

COLUMNS = ["model", "corruption", "level", "name", "src", "tgt", "psnr", "ssim", "lpips", "lpips_mean", "input_psnr"]
"""robustness.csv: a row per model x corruption x level x translation; `lpips` is the per-volume sum over
slices (as in result_metrics.csv), `input_psnr` the corrupted source against the clean source (inf at level 0)."""
CLEAN = "none"
"""The corruption name of level 0."""


def model_labels(configs: list[Config], checkpoints: list[str]) -> list[str]:
    """The config names; `name:run folder/checkpoint` where those coincide; numbered if that still does."""
    labels = [cfg.name for cfg in configs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}:{Path(ckpt).resolve().parent.name}/{Path(ckpt).stem}"
                  for lab, ckpt in zip(labels, checkpoints)]
    return labels if len(set(labels)) == len(labels) else [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]


def conditions() -> list[tuple[str, int]]:
    """(corruption, level): the clean source once, then levels 1..3 of every corruption."""
    return [(CLEAN, 0)] + [(kind, level) for kind, c in CORRUPTIONS.items() for level in range(1, len(c.levels) + 1)]


def stack_seed(seed: int, name: str, src: int, kind: str) -> int:
    """A generator seed fixed by (config seed, subject, source, corruption), whatever the run order; the same
    for all levels, so that a level differs from the next by its strength alone."""
    return seed * 1_000_003 + zlib.crc32(f"{name}/{src}/{kind}".encode())


def run(test: TestRun, models: dict[str, Translator], lpips: LPIPSMetric | None, slices: int | None = None) -> str:
    """Every model on every condition of every subject of the list -> the markdown table; writes
    robustness.csv, robustness.md (means, with the corrupted source's own PSNR against the clean
    source) and robustness.png (PSNR against level, a panel per corruption) into `test.out`.
    slices: only the central N slices (default data.n_slices)."""
    device = test.translator.device
    test.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, code in tqdm(test.subjects, desc="subjects", dynamic_ncols=True):
        stacks = {s: load_eval_stack(test.cache, name, s, slices) for s in range(N_SEQ)}  # (S,1,crop,crop) each
        for src in available(code):
            for kind, level in conditions():
                gen = torch.Generator().manual_seed(stack_seed(test.cfg.seed, name, src, kind))
                source = corrupt(stacks[src], kind, level, gen) if level else stacks[src]
                input_psnr = float(psnr(source[:, 0], stacks[src][:, 0]))
                for label, translator in models.items():
                    latent = translator.encode(source, src)  # one encoding serves every target
                    for tgt in missing(code):
                        pred = translator.decode(latent, tgt)
                        rows.append({"model": label, "corruption": kind, "level": level, "name": name,
                                     "src": SEQUENCES[src], "tgt": SEQUENCES[tgt], "input_psnr": input_psnr,
                                     **score(pred, stacks[tgt].to(device), lpips)})
    write_metrics(rows, test.out / "robustness.csv", COLUMNS)
    table = markdown(rows, len(test.subjects), slices or test.cfg.data.n_slices)
    (test.out / "robustness.md").write_text(table)
    robustness_plot(means(rows, "psnr"), means(rows, "input_psnr"), test.out / "robustness.png")
    return table


def means(rows: list[dict], key: str) -> dict[tuple[str, str, int], float]:
    """Mean of `key` per (model, corruption, level) over translations and subjects; level 0 shared by all."""
    groups = defaultdict(list)
    for row in rows:
        kinds = CORRUPTIONS if row["corruption"] == CLEAN else [row["corruption"]]
        for kind in kinds:
            groups[(row["model"], kind, row["level"])].append(row[key])
    return {k: float(np.mean(v)) for k, v in groups.items()}


def markdown(rows: list[dict], n_subjects: int, n_slices: int) -> str:
    models = list(dict.fromkeys(row["model"] for row in rows))
    first = models[0]
    values = {key: means(rows, key) for key in ("psnr", "ssim", "lpips", "input_psnr")}
    head = ["corruption", "row", "clean"] + [f"level {i}" for i in range(1, 4)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, c in CORRUPTIONS.items():
        strengths = ["-"] + [f"{s:g}" for s in c.levels]
        inputs = [f"{values['input_psnr'][(first, kind, lv)]:.1f}" for lv in range(1, 4)]
        lines.append(f"| {kind} | strength | " + " | ".join(strengths) + " |")
        lines.append(f"| {kind} | input PSNR vs clean source | inf | " + " | ".join(inputs) + " |")
        for model in models:
            cells = []
            for lv in range(4):
                lp = values["lpips"][(model, kind, lv)]
                cells.append(f"{values['psnr'][(model, kind, lv)]:.2f} / {values['ssim'][(model, kind, lv)]:.3f}"
                             f" / {'n/a' if math.isnan(lp) else f'{lp:.2f}'}")
            lines.append(f"| {kind} | {model} | " + " | ".join(cells) + " |")
    n = sum(1 for row in rows if row["model"] == first and row["corruption"] == CLEAN)
    note = (f"\nMeans over {n} single-step translations (every available source x missing target) of "
            f"{n_subjects} subjects, {n_slices} central slices each. Model rows: PSNR / SSIM / LPIPS of the "
            "translation of the corrupted source against the CLEAN target (data range 2; LPIPS is the per-volume "
            "sum over slices, n/a without AlexNet weights). `input PSNR` is the corrupted source against the "
            "clean source: how strong the corruption is. Strengths: see `vq.corruptions`.\n")
    return "\n".join(lines) + "\n" + note
