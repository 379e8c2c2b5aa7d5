"""The BraTS "BraSyn" benchmark (missing MRI synthesis): its folders, its random drop, its metrics.

- Layout: one folder per case, `BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1n,t1c,t2w,t2f}.nii.gz`
  (t1n = T1, t1c = T1Gd, t2w = T2, t2f = FLAIR) and `-seg.nii.gz`; BraTS2021-named case folders
  (`<ID>/<ID>_{t1,t1ce,t2,flair}.nii.gz`) are read the same way.
- `drop_modalities`: the challenge's pseudo-validation set from complete cases: NumPy's legacy
  RNG seeded 123456, one `np.random.randint(0, 4, size=n_cases)` draw over the modalities in
  the order t1c, t1n, t2f, t2w; the cases in sorted order (the challenge's script took the file
  system's listing order, which is not guaranteed sorted).
- `complete_folder`: each case's one missing file synthesised from its three available ones
  (fused latent) on the case's own grid, written under the missing file's name.
- `brasyn_scores`: the challenge's metrics. Each volume is clipped to its own 0.5 and 99.5
  percentiles (the lower bound at least 0) and scaled to [0, 1]; the segmentation is binarised
  (label > 0); one 3D SSIM map (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, data range 1)
  of the (image x mask) pair and one of the (image x (1 - mask)) pair; SSIM tumour / non-tumour
  are the means of those maps over the tumour / non-tumour voxels. PSNR and MSE over the same
  voxels. The SSIM maps come from scikit-image (reflect-padded Gaussian filtering).
"""
from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vq.files import write_atomic, write_csv
from vq.inference import Translator, synthesize
from vq.labels import load_labels
from vq.metrics import mean_and_std
from vq.nifti import NiftiError, load_volume, save_like, to_intensity
from vq.sequences import BRASYN_NAMES, SEG, SEQUENCES, file_naming, find_subject_file, subject_file

log = logging.getLogger(__name__)

DROP_ORDER = ("t1c", "t1n", "t2f", "t2w")
"""The modality order of the challenge's random drop."""
DROP_SEED = 123456
COPY_FROM: dict[str, str] = {"t1n": "t1c", "t1c": "t1n", "t2w": "t2f", "t2f": "t2w"}
"""Copy baseline: the available sequence copied in place of each missing one (its neighbour)."""
SCORE_COLUMNS = ["ssim_tumour", "ssim_nontumour", "psnr_tumour", "psnr_nontumour", "mse_tumour", "mse_nontumour"]
CASE_COLUMNS = ["case", "dropped", "method", *SCORE_COLUMNS]
READ_NAMINGS = ("brasyn", "brats2021")
"""The namings a case folder is read in, BraSyn's own first."""
SEQUENCE_OF: dict[str, str] = {suffix: seq for seq, suffix in BRASYN_NAMES.items()}
"""BraSyn file suffix -> this project's sequence name."""


class BrasynError(ValueError):
    """A case folder that cannot be read; the message names it."""


# ----------------------------------------------------------------------------- folders
def case_files(folder: str | Path) -> dict[str, Path]:
    """The image files a case folder holds: {BraSyn suffix: path}, for BraSyn or BraTS2021 naming."""
    return {suffix: path for seq, suffix in BRASYN_NAMES.items()
            if (path := find_subject_file(folder, seq, READ_NAMINGS))}


def file_name(case: str, suffix: str, like: Path) -> str:
    """The file name of a case's modality (BraSyn suffix) in the naming of `like`, a sibling file."""
    return subject_file(case, SEQUENCE_OF[suffix], file_naming(like, case))


def cases(root: str | Path) -> list[Path]:
    """Case folders of a root, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise BrasynError(f"{root}: folder not found")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def to_brasyn_names(src_root: str | Path, out_root: str | Path, prefix: str = "BraTS-GLI") -> list[str]:
    """Copy BraTS2021-named cases (<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz) into BraSyn naming:
    case k (sorted) becomes <prefix>-XXXXX-000 with files -t1n, -t1c, -t2w, -t2f, -seg. -> case names."""
    names = []
    for k, folder in enumerate(cases(src_root)):
        case = f"{prefix}-{k:05d}-000"
        target = Path(out_root) / case
        target.mkdir(parents=True, exist_ok=True)
        for kind in (*SEQUENCES, SEG):
            source = folder / subject_file(folder.name, kind)
            if not source.is_file():
                raise BrasynError(f"{source}: not found")
            shutil.copy2(source, target / subject_file(case, kind, "brasyn"))
        names.append(case)
    return names


def drop_modalities(src_root: str | Path, out_root: str | Path) -> list[tuple[str, str]]:
    """Copy complete cases to out_root with one modality dropped per case, as the challenge drew them.

    The segmentation is not copied (the evaluator reads it from src_root). Writes
    out_root/dropped.csv (case, dropped) and returns its rows.
    """
    folders = cases(src_root)
    np.random.seed(DROP_SEED)
    draws = np.random.randint(0, 4, size=len(folders))
    rows = []
    for folder, draw in zip(folders, draws):
        files = case_files(folder)
        if len(files) != 4:
            raise BrasynError(f"{folder}: not a complete case ({', '.join(sorted(files)) or 'no images'})")
        dropped = DROP_ORDER[int(draw)]
        target = Path(out_root) / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for suffix, path in files.items():
            if suffix != dropped:
                shutil.copy2(path, target / path.name)
        rows.append((folder.name, dropped))
    write_csv(Path(out_root) / "dropped.csv", [{"case": case, "dropped": dropped} for case, dropped in rows])
    return rows


def complete_folder(translator: Translator, in_root: str | Path, out_root: str | Path, flat: bool = False,
                    percentile: float = 99.0) -> dict[str, str]:
    """Synthesise each case's one missing modality from its three available ones (fused latent),
    on the case's own grid and geometry, under the missing file's own name: out_root/<case>/<file>
    or, with `flat`, out_root/<file>. A case with 0 or 2+ missing files, or unreadable ones, is
    logged and skipped. -> {case: what happened ("t1c" written, or why skipped)}.
    """
    report = {}
    for folder in cases(in_root):
        files = case_files(folder)
        absent = [s for s in BRASYN_NAMES.values() if s not in files]
        if len(absent) != 1:
            report[folder.name] = f"skipped: {len(absent)} missing files, expected exactly 1"
            log.warning("%s: %s", folder.name, report[folder.name])
            continue
        try:
            volumes = {seq: load_volume(files[suffix]) for seq, suffix in BRASYN_NAMES.items() if suffix in files}
        except NiftiError as err:
            report[folder.name] = f"skipped: {err}"
            log.warning("%s: %s", folder.name, report[folder.name])
            continue
        first = next(iter(volumes.values()))
        shapes = {v.data.shape for v in volumes.values()}
        if len(shapes) > 1:
            report[folder.name] = f"skipped: the available files differ in shape {sorted(shapes)}"
            log.warning("%s: %s", folder.name, report[folder.name])
            continue
        missing_seq = SEQUENCE_OF[absent[0]]
        out = synthesize(translator, {seq: v.data for seq, v in volumes.items()}, [missing_seq], percentile)
        name = file_name(folder.name, absent[0], first.path)
        path = Path(out_root) / (name if flat else f"{folder.name}/{name}")
        save_like(to_intensity(out[missing_seq]), first, path)
        report[folder.name] = f"{absent[0]} written"
        log.info("%s: %s -> %s", folder.name, absent[0], path)
    return report


# ----------------------------------------------------------------------------- metrics
def brasyn_normalize(volume: np.ndarray) -> np.ndarray:
    """Clip to the volume's own 0.5 and 99.5 percentiles (lower bound at least 0), scale to [0, 1]."""
    volume = np.asarray(volume, np.float32)
    low = max(float(np.percentile(volume, 0.5)), 0.0)
    high = float(np.percentile(volume, 99.5))
    if high <= low:
        return np.zeros_like(volume)
    return (np.clip(volume, low, high) - low) / (high - low)


def _region_ssim(pred: np.ndarray, real: np.ndarray, region: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if not region.any():
        return float("nan")
    weight = region.astype(np.float32)
    _, ssim_map = structural_similarity(real * weight, pred * weight, data_range=1.0, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, K1=0.01, K2=0.03, full=True)
    return float(ssim_map[region].mean())


def _region_errors(pred: np.ndarray, real: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    if not region.any():
        return float("nan"), float("nan")
    mse = float(np.mean((pred[region] - real[region]) ** 2))
    return mse, float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def brasyn_scores(pred: np.ndarray, real: np.ndarray, seg: np.ndarray) -> dict[str, float]:
    """The challenge's scores of one synthesised volume against the real one (same grid)."""
    pred, real = brasyn_normalize(pred), brasyn_normalize(real)
    tumour = np.asarray(seg) > 0
    out = {}
    for name, region in (("tumour", tumour), ("nontumour", ~tumour)):
        out[f"ssim_{name}"] = _region_ssim(pred, real, region)
        out[f"mse_{name}"], out[f"psnr_{name}"] = _region_errors(pred, real, region)
    return out


def evaluate_folder(completed: str | Path, truth: str | Path, dropped: str | Path) -> tuple[list[dict], list[dict]]:
    """Score completed cases against the complete originals: -> (per-case rows, summary rows).

    completed: the completion output (per case or flat); truth: the complete cases with their
    segmentations; dropped: the dropped.csv of `drop_modalities`. Each case is scored for the
    model and for the copy baseline (`COPY_FROM`: the neighbouring available sequence).
    """
    completed, truth = Path(completed), Path(truth)
    with open(dropped, newline="") as f:
        plan = [(row["case"], row["dropped"]) for row in csv.DictReader(f)]
    inputs = []  # (case, dropped, real, segmentation, synthesised, copied): every file, found and read once first
    for case, suffix in tqdm(plan, desc="checking cases", dynamic_ncols=True, leave=False):
        files, seg = case_files(truth / case), find_subject_file(truth / case, SEG, READ_NAMINGS)
        if suffix not in files or seg is None:
            raise BrasynError(f"{truth / case}: no real {suffix} or no segmentation to score against")
        name = file_name(case, suffix, files[suffix])
        synthesised = next((p for p in (completed / case / name, completed / name) if p.is_file()), None)
        if synthesised is None:
            raise BrasynError(f"{case}: no synthesised {name} in {completed}")
        case_inputs = (files[suffix], seg, synthesised, files[COPY_FROM[suffix]])
        for path in case_inputs:  # a broken file stops the run here, before any score
            load_labels(path, allowed=None) if path == seg else load_volume(path)
        inputs.append((case, suffix, *case_inputs))
    rows = []
    for case, suffix, real_path, seg, synthesised, copied in tqdm(inputs, desc="scoring", dynamic_ncols=True):
        real = load_volume(real_path).data
        labels = load_labels(seg, allowed=None)  # all zeros allowed: a case may have no tumour
        for method, path in (("model", synthesised), ("copy_" + COPY_FROM[suffix], copied)):
            rows.append({"case": case, "dropped": suffix, "method": method,
                         **brasyn_scores(load_volume(path).data, real, labels)})
    return rows, summarize(rows)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std of each score per (dropped modality, method), and over all cases per method."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dropped"], row["method"].split("_")[0]), []).append(row)
        groups.setdefault(("all", row["method"].split("_")[0]), []).append(row)
    out = []
    for (dropped, method), members in sorted(groups.items()):
        out.append({"dropped": dropped, "method": method, "n": len(members), **mean_and_std(members, SCORE_COLUMNS)})
    return out


def summary_markdown(summary: list[dict]) -> str:
    lines = ["| dropped | method | n | SSIM tumour | SSIM non-tumour | PSNR tumour | PSNR non-tumour |",
             "|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['dropped']} | {e['method']} | {e['n']} | {e['ssim_tumour']:.3f} | "
                     f"{e['ssim_nontumour']:.3f} | {e['psnr_tumour']:.2f} | {e['psnr_nontumour']:.2f} |")
    return "\n".join(lines) + ("\n\nBraSyn metrics: each volume clipped to its own 0.5-99.5 percentiles and scaled "
                               "to [0, 1]; SSIM maps (Gaussian 11, sigma 1.5) of the masked pairs averaged over the "
                               "tumour (seg > 0) and non-tumour voxels; PSNR with data range 1. `copy` copies the "
                               "neighbouring available sequence (t1n <-> t1c, t2w <-> t2f).\n")


def write_results(rows: list[dict], summary: list[dict], out: str | Path) -> None:
    """brasyn_metrics.csv (per case and method), brasyn_summary.csv and brasyn_summary.md."""
    out = Path(out)
    write_csv(out / "brasyn_metrics.csv", rows, CASE_COLUMNS)
    write_csv(out / "brasyn_summary.csv", summary, ["dropped", "method", "n"] + [c for k in SCORE_COLUMNS
                                                                                 for c in (k, f"{k}_std")])
    write_atomic(out / "brasyn_summary.md", lambda f: f.write(summary_markdown(summary).encode()))
