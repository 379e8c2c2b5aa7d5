"""The paper's evaluation protocol (docs/method.md, "Evaluation protocol") and its summary tables.

For each test subject: every available source x every missing target, single
step and through configured multi-step paths, plus a "copy the source"
baseline. PSNR/SSIM use data range 2 on the whole [-1, 1] stack; `lpips` is the
per-volume SUM of per-slice LPIPS (the reference's table numbers),
`lpips_mean` the per-slice mean. `evaluate` runs it on a `TestRun` and writes the results.
`validate`, `latent_gap` and `validation_grid` are the training loop's share: the same translator
on the validation subjects' central slices.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vq.config import Config
from vq.dataloader.brats import SliceCache, subject_files
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.preprocess import central_slices, pad_or_crop
from vq.files import write_atomic, write_csv
from vq.inference import Translator
from vq.labels import ContrastSpec, label_stack, load_labels, subject_labels
from vq.metrics import (LPIPSMetric, brain_mask, contrast_scores, lpips_volume, mean_and_std, psnr, region_psnr,
                        ssim3d_regions)
from vq.nifti import open_image, ras_shape, save_like, to_intensity
from vq.sequences import DISPLAY_NAMES, N_SEQ, SEG, SEQUENCES, available, missing, path_name, seq_index, subject_file
from vq.viz import sample_grid, save_png, translation_figure

METRIC_COLUMNS = ["name", "src", "tgt", "psnr", "ssim", "lpips", "steps", "lpips_mean",
                  "psnr_brain", "ssim_brain", "contrast_error", "tissue_order",
                  "psnr_tumour", "ssim_tumour", "psnr_nontumour", "ssim_nontumour"]
"""result_metrics.csv: the reference's six columns first, then ours (brain region, tissue contrast, and
inside / outside the tumour where a segmentation exists)."""
SUMMARY_METRICS = ("psnr", "ssim", "lpips", "psnr_brain", "ssim_brain", "contrast_error", "tissue_order",
                   "psnr_tumour", "ssim_tumour", "psnr_nontumour", "ssim_nontumour")
SUMMARY_COLUMNS = ["method", "steps", "src", "tgt", "n"] + [c for m in SUMMARY_METRICS for c in (m, f"{m}_std")]
CONTRAST_COLUMNS = ["name", "src", "tgt", "steps", "method", "tissue", "reference", "predicted", "real"]
"""tissue_contrast.csv: per row and tissue, the mean intensity relative to the reference region."""


@dataclass
class TestRun:
    """A trained model and a test list, ready to run (`vq.cli.open_test_run` builds it from a script's flags)."""

    cfg: Config
    translator: Translator
    root: Path
    """The data folder (BraTS layout)."""
    data_list: Path
    subjects: list[tuple[str, int]]
    """(name, availability code) from `data_list`."""
    cache: SliceCache
    """Slice cache of `subjects`, complete."""
    out: Path
    """Results folder."""


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


@dataclass
class SubjectLabels:
    """A subject's label stack (S, H, W) for the contrast metric, and what to compare on it."""

    stack: torch.Tensor | None
    spec: ContrastSpec | None
    tumour: torch.Tensor | None = None
    """(S, H, W) bool, the BraTS segmentation > 0, for the tumour / non-tumour scores."""


def score(pred: torch.Tensor, target: torch.Tensor, lpips: LPIPSMetric | None,
          labels: SubjectLabels | None = None) -> dict:
    """PSNR/SSIM (data range 2) on the whole stack and inside the brain (the real target's
    non-background voxels), and with a segmentation inside the tumour (seg > 0) and in the brain
    outside it; LPIPS per slice, summed and averaged; with a label map, the tissue contrast
    (`vq.metrics.contrast_scores`; its per-tissue ratios under "ratios")."""
    pred, target = pred[:, 0], target[:, 0]  # (S,1,H,W) -> (S,H,W): one 3D stack, one value per metric
    brain = brain_mask(target)
    regions = {"brain": brain}
    if labels is not None and labels.tumour is not None:
        tumour = labels.tumour.to(target.device)
        regions.update(tumour=tumour, nontumour=brain & ~tumour)
    row = {"psnr": float(psnr(pred, target)), "lpips": math.nan, "lpips_mean": math.nan,
           **{f"psnr_{name}": region_psnr(pred, target, mask) for name, mask in regions.items()},
           **ssim3d_regions(pred.cpu().numpy(), target.cpu().numpy(),
                            {name: mask.cpu().numpy() for name, mask in regions.items()}),
           "contrast_error": math.nan, "tissue_order": math.nan, "ratios": {}}
    if lpips is not None:
        row["lpips"], row["lpips_mean"] = lpips_volume(lpips, pred, target)
    if labels is not None and labels.stack is not None:
        stack = labels.stack.to(target.device)
        reference = (stack == labels.spec.reference_label) & brain
        scores, row["ratios"] = contrast_scores(pred, target, stack, labels.spec.classes, reference,
                                                labels.spec.reference_name)
        row.update(scores)
    return row


def contrast_rows(row: dict, reference: str) -> list[dict]:
    """The tissue_contrast.csv rows of one result row."""
    return [{**{k: row[k] for k in ("name", "src", "tgt", "steps", "method")}, "tissue": tissue,
             "reference": reference, "predicted": predicted, "real": real}
            for tissue, (predicted, real) in row["ratios"].items()]


def evaluate(test: TestRun, lpips: LPIPSMetric | None) -> list[dict]:
    """The protocol on every subject of the list -> the summary; writes into `test.out`:
    result_metrics.csv (model), baseline_metrics.csv (copy the source), tissue_contrast.csv (where a
    label map exists), summary.csv and summary.md, figures/<ID>.png (source, prediction and real target
    of every single step) and, with test.save_nifti, nifti/<ID>/ in the source files' geometry."""
    cfg, device, out = test.cfg, test.translator.device, test.out
    for name, _ in tqdm(test.subjects, desc="checking label maps", dynamic_ncols=True, leave=False):
        eval_labels(test.root, name, cfg)  # a broken one stops the run here, before any prediction
    out.mkdir(parents=True, exist_ok=True)
    rows, baseline, contrast = [], [], []
    for name, code in tqdm(test.subjects, desc="subjects", dynamic_ncols=True):
        stacks = {s: load_eval_stack(test.cache, name, s, n_test_slices(cfg)) for s in range(N_SEQ)}  # (S,1,crop,crop)
        labels = eval_labels(test.root, name, cfg)
        memo = {}  # latents and intermediate stacks shared by this subject's translations
        copy_scores = {}  # (src, tgt) -> the copy baseline's scores, shared by single and multi-step rows
        panels = []  # (source, prediction, target) centre slices of the single steps, for the figure
        for tr in translations_for(code, cfg.test.multi_step):
            pred = test.translator.translate(stacks[tr.src], tr.path, memo)
            target = stacks[tr.tgt].to(device)
            names = {"name": name, "src": SEQUENCES[tr.src], "tgt": SEQUENCES[tr.tgt], "steps": tr.steps}
            rows.append({**names, "method": "model", **score(pred, target, lpips, labels)})
            if (tr.src, tr.tgt) not in copy_scores:
                copy_scores[tr.src, tr.tgt] = score(stacks[tr.src].to(device), target, lpips, labels)
            baseline.append({**names, "method": "copy_source", **copy_scores[tr.src, tr.tgt]})
            if labels is not None:
                contrast += contrast_rows(rows[-1], labels.spec.reference_name)
                contrast += contrast_rows(baseline[-1], labels.spec.reference_name)
            if not tr.multi:
                mid = len(pred) // 2
                panels.append((tr.src, tr.tgt, stacks[tr.src][mid, 0].numpy(), pred[mid, 0].cpu().numpy(),
                               stacks[tr.tgt][mid, 0].numpy()))
            if cfg.test.save_nifti:
                save_prediction(pred, test.root, name, tr, cfg, out)
        if panels:
            save_png(translation_figure(panels, f"{name}: centre slice, source / prediction / real target"),
                     out / "figures" / f"{name}.png")
    write_metrics(rows, out / "result_metrics.csv")
    write_metrics(baseline, out / "baseline_metrics.csv")
    if contrast:
        write_metrics(contrast, out / "tissue_contrast.csv", CONTRAST_COLUMNS)
    summary = summarize(rows + baseline)
    write_summary(summary, out / "summary.csv", out / "summary.md")
    return summary


def n_test_slices(cfg: Config) -> int:
    """Central slices evaluated per volume: all `data.n_slices`, or fewer with test.n_slices."""
    return min(cfg.test.n_slices or cfg.data.n_slices, cfg.data.n_slices)


def eval_labels(root: Path, name: str, cfg: Config) -> SubjectLabels | None:
    """The subject's label stacks, cut like the image stacks: the contrast metric's map (the tissue map
    on the phantom, else the BraTS segmentation) and the tumour mask (segmentation > 0); None when the
    subject has neither (test subjects need no segmentation)."""
    cut = lambda labels: label_stack(labels, cfg.data.n_slices, n_test_slices(cfg), cfg.data.crop)
    seg_path = root / name / subject_file(name, SEG, cfg.data.naming)
    seg = cut(load_labels(seg_path)) if seg_path.is_file() else None
    found = subject_labels(root, name, cfg.data.naming)
    if found is None:
        return None
    path, spec = found
    stack = seg if path == seg_path else cut(load_labels(path, allowed=(0, *spec.classes.values(), spec.reference_label)))
    return SubjectLabels(stack, spec, None if seg is None else seg > 0)


def save_prediction(pred: torch.Tensor, root: Path, name: str, tr: Translation, cfg: Config, out: Path) -> Path:
    """Paste the (S,1,crop,crop) prediction into the source file's full grid and geometry."""
    source = open_image(subject_files(root, name, [tr.src], cfg.data.naming)[SEQUENCES[tr.src]])  # the seg file is optional here
    full = np.zeros(ras_shape(source), dtype=np.float32)  # (X, Y, Z) in RAS, background 0
    x, y, z = full.shape
    # centred fitting undoes the centre crop (or pad), background -1 -> 0: (S,1,crop,crop) -> (S,X,Y)
    volume = to_intensity(pad_or_crop(pred[:, 0].cpu().numpy(), (x, y)))
    picked = np.arange(z)[central_slices(z, cfg.data.n_slices)][central_slices(cfg.data.n_slices, len(volume))]
    full[:, :, picked] = volume.transpose(1, 2, 0)  # (S,X,Y) -> (X,Y,S), the slices of load_eval_stack
    via = "" if not tr.multi else "_via_" + "_".join(SEQUENCES[i] for i in tr.path[1:-1])
    path = out / "nifti" / name / f"{name}_{SEQUENCES[tr.tgt]}_from_{SEQUENCES[tr.src]}{via}.nii.gz"
    return save_like(full, source, path)


def write_metrics(rows: list[dict], path: str | Path, columns: list[str] = METRIC_COLUMNS) -> Path:
    """A metrics CSV (result_metrics.csv by default), written atomically; NaN (LPIPS unavailable)
    becomes an empty cell."""
    return write_csv(path, rows, columns)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std per (method, single/multiple, src, tgt) over subjects."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        steps = "multiple" if row["steps"].count(">") > 1 else "single"
        groups[(row["method"], steps, row["src"], row["tgt"])].append(row)
    out = []
    for (method, steps, src, tgt), members in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "model", kv[0][1] != "single", SEQUENCES.index(kv[0][2]), SEQUENCES.index(kv[0][3]))):
        out.append({"method": method, "steps": steps, "src": src, "tgt": tgt, "n": len(members),
                    **mean_and_std(members, SUMMARY_METRICS)})
    return out


def write_summary(summary: list[dict], csv_path: str | Path, md_path: str | Path) -> None:
    """summary.csv and summary.md, each written atomically."""
    write_csv(csv_path, summary, SUMMARY_COLUMNS)
    write_atomic(md_path, lambda f: f.write(summary_markdown(summary).encode()))


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def _table(summary: list[dict], cell_text, head_text: str) -> list[str]:
    pairs = sorted({(e["src"], e["tgt"]) for e in summary},
                   key=lambda p: (SEQUENCES.index(p[0]), SEQUENCES.index(p[1])))
    rows = sorted({(e["steps"], e["method"]) for e in summary}, key=lambda r: (r[0] != "single", r[1] != "model"))
    cell = {(e["steps"], e["method"], e["src"], e["tgt"]): e for e in summary}
    head = ["step", "method"] + [f"{DISPLAY_NAMES[s]}->{DISPLAY_NAMES[t]} {head_text}" for s, t in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for steps, method in rows:
        values = [cell_text(cell[steps, method, s, t]) if (steps, method, s, t) in cell else "-" for s, t in pairs]
        lines.append(f"| {steps} | {method} | " + " | ".join(values) + " |")
    return lines


def summary_markdown(summary: list[dict]) -> str:
    """Two tables: the whole image laid out like the paper's Table 1, then inside the brain with
    the tissue contrast; a row per (steps, method), a column per translation."""
    whole = _table(summary, lambda e: f"{e['psnr']:.1f} / {e['ssim']:.3f} / {_fmt(e['lpips'], '.2f')} (n={e['n']})",
                   "PSNR / SSIM / LPIPS")
    brain = _table(summary, lambda e: (f"{_fmt(e['psnr_brain'], '.1f')} / {_fmt(e['ssim_brain'], '.3f')} / "
                                       f"{_fmt(e['contrast_error'], '.3f')} / {_fmt(e['tissue_order'], '.0%')}"),
                   "PSNR / SSIM / contrast error / order kept")
    note = ("\nMeans over test subjects. Whole image: PSNR and SSIM with data range 2 on the stack of central "
            "slices (128 x 192 x 192 in the paper; fewer with test.n_slices) in [-1, 1], as in the paper's Table 1; "
            "LPIPS is the per-volume SUM over slices (AlexNet, v0.1); "
            "`lpips_mean` in result_metrics.csv is the per-slice mean. Most of a stack is background, so the "
            "whole-image numbers also reward a smooth brain-shaped blur. Brain: PSNR over the real target's "
            "brain voxels and the SSIM map averaged over them; contrast error: mean absolute difference "
            "between predicted and real tissue intensities relative to the reference tissue (white matter on "
            "the phantom, the brain outside the tumour on BraTS; tissue_contrast.csv has each tissue); order "
            "kept: share of subjects whose tissues sort by intensity as in the real image. `copy_source` "
            "scores the source image itself as the prediction.\n")
    text = "## Whole image\n\n" + "\n".join(whole) + "\n\n## Inside the brain\n\n" + "\n".join(brain) + "\n"
    if any(math.isfinite(e.get("psnr_tumour", math.nan)) for e in summary):
        tumour = _table(summary, lambda e: (f"{_fmt(e['psnr_tumour'], '.1f')} / {_fmt(e['ssim_tumour'], '.3f')}, "
                                            f"{_fmt(e['psnr_nontumour'], '.1f')} / {_fmt(e['ssim_nontumour'], '.3f')}"),
                        "tumour PSNR / SSIM, rest of the brain PSNR / SSIM")
        text += ("\n## Inside and outside the tumour\n\n" + "\n".join(tumour) + "\n\nTumour: the segmentation's "
                 "voxels (label > 0) in the evaluated crop; rest of the brain: the other brain voxels.\n")
    return text + note


def validate(translator: Translator, stacks: dict[str, dict[int, torch.Tensor]],
             identity: bool = True) -> tuple[float, float, int, float, int]:
    """The training's validation on `stacks` (subject -> {sequence index: (S,1,H,W) central slices}):
    sums of `translation_psnr` and of `latent_gap`, so that ranks can add theirs before
    `validation_row` divides."""
    return *translation_psnr(translator, stacks, identity), *latent_gap(translator, stacks)


def validation_row(total: float, brain: float, count: int, gap: float, gap_count: int) -> tuple[dict, int]:
    """`validate`'s sums -> (the log.csv row: val_psnr, val_psnr_brain, val_latent_gap; the pairs scored)."""
    return {"val_psnr": total / max(count, 1), "val_psnr_brain": brain / max(count, 1),
            "val_latent_gap": gap / gap_count if gap_count else math.nan}, count


@torch.no_grad()
def translation_psnr(translator: Translator, stacks: dict[str, dict[int, torch.Tensor]],
                     identity: bool = True) -> tuple[float, float, int]:
    """Sums of PSNR (data range 2) on the whole stack and inside the brain over every (available source,
    available target) pair, source == target included when `identity` (the reference's validation,
    train.val_identity); -> (sum, brain sum, count)."""
    total, total_brain, count = 0.0, 0.0, 0
    for seqs in stacks.values():
        for s, src in seqs.items():
            memo = {}  # the source is encoded once for all its targets
            for t, tgt in seqs.items():
                if identity or s != t:
                    pred, tgt = translator.translate(src, [s, t], memo), tgt.to(translator.device)
                    total += float(psnr(pred[:, 0], tgt[:, 0]))  # one value per stack
                    total_brain += region_psnr(pred, tgt, brain_mask(tgt))
                    count += 1
    return total, total_brain, count


@torch.no_grad()
def latent_gap(translator: Translator, stacks: dict[str, dict[int, torch.Tensor]]) -> tuple[float, int]:
    """How common the latent is: for each pair of sequences of a subject, the mean squared distance
    between their latents of the same slice, over the same distance to the other sequence's latent of
    another slice (the slices rolled by half the stack), inside the brain; -> (sum over pairs, count).
    0: both sequences give one latent; about 1: no closer than a different slice's.
    """
    total, count = 0.0, 0
    for seqs in stacks.values():
        latents = {s: translator.encode(stack, s) for s, stack in seqs.items()}  # (S, D, h, w)
        names = sorted(latents)
        for a_pos, a in enumerate(names):
            for b in names[a_pos + 1:]:
                za, zb = latents[a], latents[b]
                brain = F.interpolate(brain_mask(seqs[a]).float(), size=za.shape[-2:], mode="area")[:, 0] > 0.5
                brain = brain.to(za.device)
                same = ((za - zb) ** 2).sum(1)[brain].mean()
                different = ((za - zb.roll(len(zb) // 2, dims=0)) ** 2).sum(1)[brain].mean()
                if brain.any() and different > 0:
                    total += float(same / different)
                    count += 1
    return total, count


@torch.no_grad()
def validation_grid(translator: Translator, stacks: dict[str, dict[int, torch.Tensor]], cache: SliceCache,
                    title: str) -> np.ndarray:
    """The training's sample grid (`vq.viz.sample_grid`): the centre slice of the first validation
    subject, its real images of all four sequences (valid subjects are checked for all four) and the
    translations of every available source to all four."""
    name, seqs = next(iter(stacks.items()))
    n = next(iter(seqs.values())).shape[0]
    mid = slice(n // 2, n // 2 + 1)
    truth = {s: load_eval_stack(cache, name, s, n)[mid][0, 0].numpy() for s in range(N_SEQ)}
    translations = {}
    for s, stack in seqs.items():
        memo = {}
        translations[s] = {t: translator.translate(stack[mid], [s, t], memo)[0, 0].cpu().numpy() for t in range(N_SEQ)}
    return sample_grid(truth, translations, f"{name}: {title}")
