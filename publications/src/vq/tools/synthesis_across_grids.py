"""Synthesis from sources on different grids, measured on the phantom (docs/usage.md, "Your own scans").

    python publications/src/vq/tools/synthesis_across_grids.py -d cpu -c CONFIG -l CHECKPOINT \\
        -o outputs/results/across_grids [--root data/phantom] [--subjects 3]

For each test subject, T1Gd and T2 are synthesised on the T1's grid from the 1 mm T1 plus a FLAIR
that is, in turn:
- `aligned`: the original 1 mm FLAIR (the reference);
- `thick`: the FLAIR as a 0.9 x 0.9 x 5 mm acquisition in another orientation (voxel axes swapped
  and flipped in-plane, tilted 12 degrees about the left-right axis; a Gaussian slice profile of 5 mm
  FWHM), made with SimpleITK, so the synthesis's own resampling is not used to make its input;
- `moved`: the 1 mm FLAIR with the head rotated (6, -4, 8 degrees) and shifted (7, -5, 4 mm) in the
  scanner, as patient motion between scans; synthesised as is and with --register.
Each prediction (`<tgt>_fused`) is scored against the real target: PSNR over the target's brain
voxels, both on [-1, 1] (data range 2) as in the evaluation. Writes across_grids.csv and
across_grids.md (mean per case and target, and the difference from `aligned`), and the registration
error: the mean distance, over the brain's voxels, between where the written transform and the
true motion send them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from vq.cli import add_model_args, run_main
from vq.config import load_config, resolve_path
from vq.dataloader.brats import subject_files
from vq.dataloader.lists import read_list
from vq.dataloader.preprocess import normalize
from vq.files import write_csv
from vq.grid import LPS, Grid, grid_of, to_sitk
from vq.metrics import region_psnr
from vq.nifti import load_volume
from vq.tools.synthesize import main as synthesize

log = logging.getLogger("across_grids")

TARGETS = ("t1ce", "t2")
CASES = {"aligned": ("flair", []), "thick": ("flair_thick", []), "moved": ("flair_moved", []),
         "moved_registered": ("flair_moved", ["--register"])}
MOTION_DEG, MOTION_MM = (6.0, -4.0, 8.0), (7.0, -5.0, 4.0)


def thick_grid(grid: Grid) -> Grid:
    """A 0.9 x 0.9 x 5 mm grid over `grid`'s field of view: in-plane axes swapped and flipped, tilted 12 degrees."""
    tilt = np.radians(12.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    axes = rotation @ np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # columns: voxel axes in RAS
    spacing = np.array([0.9, 0.9, 5.0])
    edges = grid.affine[:3, :3] * np.asarray(grid.shape)  # (3, 3) columns: the field of view's edges in mm
    shape = np.ceil(np.abs(axes.T @ edges).sum(1) / spacing).astype(int)  # enough voxels to hold the whole box
    centre = grid.affine[:3, :3] @ ((np.asarray(grid.shape) - 1) / 2) + grid.affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = axes * spacing
    affine[:3, 3] = centre - affine[:3, :3] @ ((shape - 1) / 2)
    return Grid(affine, tuple(int(n) for n in shape))


def motion(centre_lps: np.ndarray) -> sitk.Euler3DTransform:
    """The head's motion in the scanner, fixed LPS point -> moved LPS point, about the volume's centre."""
    return sitk.Euler3DTransform(centre_lps.tolist(), *np.radians(MOTION_DEG), MOTION_MM)


def make_inputs(flair_path: Path, out: Path) -> tuple[Path, Path, sitk.Transform]:
    """The thick oblique FLAIR and the moved FLAIR, written with SimpleITK. -> (thick, moved, true motion)."""
    flair = sitk.ReadImage(str(flair_path), sitk.sitkFloat32)
    volume = load_volume(flair_path)
    reference = to_sitk(np.zeros(thick_grid(grid_of(volume)).shape, np.float32), thick_grid(grid_of(volume)))
    profile = sitk.SmoothingRecursiveGaussian(flair, [0.9 / 2.355, 0.9 / 2.355, 5.0 / 2.355])  # sigma = FWHM / 2.355
    thick = sitk.Resample(profile, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    brain = sitk.Resample(sitk.Cast(flair > 0, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    thick = thick * sitk.Cast(brain > 0.5, sitk.sitkFloat32)  # skull-stripped: the Gaussian's tails set to 0
    centre = flair.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in flair.GetSize()])
    truth = motion(np.asarray(centre))
    moved = sitk.Resample(flair, flair, truth.GetInverse(), sitk.sitkLinear, 0.0)  # moved(x) = flair(motion^-1 x)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "flair_thick.nii.gz", out / "flair_moved.nii.gz"
    for image, path in zip((thick, moved), paths):
        sitk.WriteImage(image, str(path))
    return *paths, truth


def registration_error(tfm: Path, truth: sitk.Transform, brain_lps: np.ndarray) -> float:
    """Mean distance (mm) between where the registered and the true transform send the brain's points."""
    found = sitk.ReadTransform(str(tfm))
    return float(np.mean([np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
                          for p in brain_lps.tolist()]))


def run(args) -> None:
    cfg = load_config(args.config, args.set)
    root = resolve_path(args.root or cfg.data.root)
    names = [name for name, _ in read_list(root / "test.csv")][: args.subjects]
    out = Path(args.out)
    rows = []
    for name in names:
        files = subject_files(root, name, naming=cfg.data.naming)
        work = out / name
        thick, moved, truth = make_inputs(files["flair"], work / "inputs")
        inputs = {"flair": files["flair"], "flair_thick": thick, "flair_moved": moved}
        t1 = load_volume(files["t1"])
        voxels = np.argwhere(t1.data > 0)[::97]  # (N, 3), a spread sample of the brain
        brain_lps = (LPS @ t1.ras_affine @ np.c_[voxels, np.ones(len(voxels))].T)[:3].T  # (N, 3) mm
        for case, (flair, extra) in CASES.items():
            code = synthesize(["-d", args.device, "-c", args.config, "-l", args.load, "-o", str(work / case),
                               "--src", "t1", str(files["t1"]), "--src", "flair", str(inputs[flair]),
                               "--tgt", *TARGETS, "--fused-only", *extra, "--set", *args.set])
            if code:
                raise SystemExit(f"synthesis of {name} ({case}) failed")
            error = registration_error(work / case / "flair_to_t1.tfm", truth, brain_lps) if extra else float("nan")
            for tgt in TARGETS:
                real = torch.from_numpy(normalize(load_volume(files[tgt]).data, cfg.data.percentile))
                pred = torch.from_numpy(load_volume(work / case / f"{tgt}_fused.nii.gz").data * 2 - 1)
                rows.append({"name": name, "case": case, "tgt": tgt, "psnr_brain": region_psnr(pred, real, real > -1),
                             "registration_error_mm": error})
            log.info("%s %s: %s", name, case, ", ".join(f"{r['tgt']} {r['psnr_brain']:.2f} dB" for r in rows[-2:]))
    write(rows, out)


def write(rows: list[dict], out: Path) -> None:
    write_csv(out / "across_grids.csv", rows)
    mean = lambda case, tgt, key="psnr_brain": float(np.mean([r[key] for r in rows if (r["case"], r["tgt"]) == (case, tgt)]))
    n = len({r["name"] for r in rows})
    lines = [f"PSNR over the brain (dB), mean of {n} phantom subjects; difference from `aligned` in brackets.", "",
             "| FLAIR given as | " + " | ".join(f"T1 + FLAIR -> {t}" for t in TARGETS) + " | registration error (mm) |",
             "|---|" + "---|" * (len(TARGETS) + 1)]
    for case in CASES:
        cells = [f"{mean(case, t):.2f} ({mean(case, t) - mean('aligned', t):+.2f})" for t in TARGETS]
        reg = mean(case, TARGETS[0], "registration_error_mm")
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {'' if np.isnan(reg) else f'{reg:.2f}'} |")
    table = "\n".join(lines) + "\n"
    (out / "across_grids.md").write_text(table)
    print(table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--root", help="phantom in BraTS layout with test.csv (default: the config's data.root)")
    p.add_argument("--subjects", type=int, default=3, help="first N subjects of the test list")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
