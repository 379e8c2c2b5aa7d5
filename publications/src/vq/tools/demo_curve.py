"""Quality against training minutes for several evaluated runs: the table and figure of docs/results.md.

    python publications/src/vq/tools/demo_curve.py outputs/exp/RUN_A outputs/exp/RUN_B -o outputs/demo_curve

Each RUN folder is a training run (`log.csv`, `config.yaml`) whose evaluation is in RUN/results
(or --results NAME). Writes OUT/demo_curve.csv (one row per run: steps, minutes, brain-region PSNR
and SSIM of model and copy, contrast error, tissue order, how many single-step translations meet
the demo's goal), OUT/demo_curve.md (the same as a table, and per translation for the last run)
and OUT/demo_curve.png.

    python publications/src/vq/tools/demo_curve.py outputs/ckpt/demo_long --snapshots -o outputs/demo_long

With --snapshots, a row per kept checkpoint of one run (`train.keep_every_epochs`: RUN/ckpt_epoch_NNNN.pth),
each evaluated into RUN/results_epoch_NNNN unless it already is (extra evaluation settings: --set).
"""
from __future__ import annotations

import argparse
import csv
import logging
import subprocess
import sys
from pathlib import Path

from vq.checkpoint import read_checkpoint
from vq.cli import add_set_arg, run_main
from vq.config import REPO_ROOT, ConfigError
from vq.files import write_atomic, write_csv
from vq.report import compare_with_copy, goal_row, read_summary, training_minutes, validation_curve
from vq.viz import plot_demo_curve

log = logging.getLogger("demo_curve")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="training run folders, each evaluated")
    p.add_argument("--results", default="results", help="evaluation folder inside each run (default results)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--snapshots", action="store_true",
                   help="one run: a row per ckpt_epoch_NNNN.pth in it, evaluated where not yet")
    p.add_argument("-d", "--device", default="cpu", help="device of the snapshot evaluations")
    add_set_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    rows, curves, last = snapshot_rows(args) if args.snapshots else run_rows(args)
    write_csv(args.out / "demo_curve.csv", rows)
    md = demo_markdown(rows, last)
    write_atomic(args.out / "demo_curve.md", lambda f: f.write(md.encode()))
    plot_demo_curve(rows, curves, args.out / "demo_curve.png", connect=args.snapshots)
    print(md)


def run_rows(args) -> tuple[list[dict], dict, list]:
    """A row per evaluated run folder, the validation curves, the last run's translations."""
    rows, curves = [], {}
    for run_dir in args.runs:
        summary = run_dir / args.results / "summary.csv"
        if not summary.is_file():
            raise FileNotFoundError(f"{summary} not found: evaluate {run_dir} first (test_brats_vq_2d_metrics.py)")
        steps, minutes = training_minutes(run_dir / "log.csv")
        comparisons = compare_with_copy(read_summary(summary))
        rows.append({"run": run_dir.name, "steps": steps, "minutes": minutes, **goal_row(comparisons)})
        curves[run_dir.name] = validation_curve(run_dir / "log.csv")
    return rows, curves, comparisons


def snapshot_rows(args) -> tuple[list[dict], dict, list]:
    """Rows of one run's kept checkpoints in training order (each evaluated first if it was not), the run's
    validation curve, the last checkpoint's translations."""
    if len(args.runs) != 1:
        raise ValueError("--snapshots takes one run folder")
    run_dir = args.runs[0]
    snapshots = sorted(run_dir.glob("ckpt_epoch_*.pth"))
    if not snapshots:
        raise FileNotFoundError(f"no ckpt_epoch_*.pth in {run_dir}: train with --set train.keep_every_epochs=N")
    with open(run_dir / "log.csv", newline="") as f:
        elapsed = {int(float(r["step"])): float(r["elapsed_s"]) for r in csv.DictReader(f) if r.get("elapsed_s")}
    rows = []
    for ckpt in snapshots:
        results = run_dir / ckpt.stem.replace("ckpt_", "results_")
        if not (results / "summary.csv").is_file():
            log.info("evaluating %s", ckpt.name)
            done = subprocess.run([sys.executable, str(REPO_ROOT / "publications/src/vq/test/test_brats_vq_2d_metrics.py"),
                                   "-d", args.device, "-c", str(run_dir / "config.yaml"), "-l", str(ckpt), "-o",
                                   str(results), "--overwrite", "--set", *args.set])
            if done.returncode:
                raise ConfigError(f"evaluating {ckpt} failed (its error is above)")
        step = read_checkpoint(ckpt)["step"]
        logged = [s for s in elapsed if s <= step]  # the last log row at or before the snapshot
        minutes = elapsed[max(logged)] / 60 if logged else float("nan")
        comparisons = compare_with_copy(read_summary(results / "summary.csv"))
        rows.append({"run": ckpt.stem.replace("ckpt_", ""), "steps": step, "minutes": minutes, **goal_row(comparisons)})
    return rows, {rows[-1]["run"]: validation_curve(run_dir / "log.csv")}, comparisons


def demo_markdown(rows: list[dict], last: list) -> str:
    n = rows[0]["translations"]
    lines = ["| run | steps | minutes | brain PSNR model / copy | brain SSIM model / copy | contrast error "
             "model / copy | order kept | meets goal |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['run']} | {r['steps']} | {r['minutes']:.1f} | {r['psnr_brain']:.2f} / "
                     f"{r['copy_psnr_brain']:.2f} | {r['ssim_brain']:.3f} / {r['copy_ssim_brain']:.3f} | "
                     f"{r['contrast_error']:.3f} / {r['copy_contrast_error']:.3f} | {r['tissue_order']:.0%} | "
                     f"{r['meets_goal']}/{n} |")
    lines += ["", f"Per translation, {rows[-1]['run']}:", "",
              "| translation | brain PSNR model / copy | brain SSIM model / copy | contrast error model / copy "
              "| order kept |", "|" + "---|" * 5]
    for c in last:
        lines.append(f"| {c.name} | {c.psnr_brain:.2f} / {c.copy_psnr_brain:.2f} | {c.ssim_brain:.3f} / "
                     f"{c.copy_ssim_brain:.3f} | {c.contrast_error:.3f} / {c.copy_contrast_error:.3f} | "
                     f"{c.tissue_order:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
