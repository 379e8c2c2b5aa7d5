"""A training study: settings x seeds, each trained and evaluated the same way, then a table of mean and spread.

    python publications/src/vq/tools/demo_study.py publications/config/vq/studies/demo_levers.yaml \
        [-o outputs/study/demo_levers] [--only SETTING ...] [--seeds N ...] [--jobs 2]

The study file names a base config, the seeds, the overrides every run shares (`common`), each
setting's own overrides (`settings`), the evaluation's overrides (`evaluate`), how many runs train at
once (`jobs`) and the torch threads of each (`threads`). Every run is the project's own training
script and its evaluation (`test_brats_vq_2d_metrics.py` on ckpt_best.pth, the held-apart test
subjects), in OUT/SETTING/seed<N>; a run whose evaluation is there is not run again, so an
interrupted study continues where it stopped. Writes OUT/study.csv (a row per run), OUT/study.md
(a row per setting: mean and sample standard deviation over the seeds), OUT/study.png (validation
brain PSNR against minutes, a line per run) and OUT/study_translations.png (the centre slice of one
test subject, `--subject`, translated by each setting's first seed: T1 and T2 to the three others,
under the real targets).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

import numpy as np

from vq.checkpoint import read_checkpoint
from vq.cli import run_main
from vq.config import ConfigError, REPO_ROOT, load_config, resolve_path
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list
from vq.files import write_atomic, write_csv
from vq.inference import load_translator
from vq.report import compare_with_copy, goal_row, read_summary, training_minutes, validation_curve
from vq.sequences import N_SEQ
from vq.viz import plot_study, save_png, settings_figure

log = logging.getLogger("demo_study")
SCRIPTS = REPO_ROOT / "publications" / "src" / "vq"
METRICS = ("psnr_brain", "ssim_brain", "psnr", "contrast_error", "tissue_order", "order_kept", "beats_copy_psnr",
           "beats_copy_psnr_whole", "meets_goal")
"""Per-run numbers averaged over a setting's seeds (the goal counts are out of `translations`)."""


@dataclass
class Study:
    config: Path
    seeds: list[int]
    settings: dict[str, list[str]]
    common: list[str]
    evaluate: list[str]
    jobs: int = 2
    threads: int = 1


def _overrides(mapping, where: str) -> list[str]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys to values, got {mapping!r}")
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in mapping.items()]


def read_study(path: Path) -> Study:
    """The study file, its keys checked and every setting's config loaded once (a typo fails here,
    not after an hour of training)."""
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"config", "seeds", "settings", "common", "evaluate", "jobs", "threads"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown study key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    for key in ("config", "seeds", "settings"):
        if key not in raw:
            raise ConfigError(f"{path}: the study names no {key!r}")
    study = Study(config=(path.parent / raw["config"]).resolve(), seeds=[int(s) for s in raw["seeds"]],
                  settings={name: _overrides(over or {}, f"{path}: settings.{name}")
                            for name, over in raw["settings"].items()},
                  common=_overrides(raw.get("common") or {}, f"{path}: common"),
                  evaluate=_overrides(raw.get("evaluate") or {}, f"{path}: evaluate"),
                  jobs=int(raw.get("jobs", 2)), threads=int(raw.get("threads", 1)))
    for name, over in study.settings.items():
        try:
            load_config(study.config, study.common + over + study.evaluate)
        except ConfigError as err:
            raise ConfigError(f"{path}: setting {name}: {err}") from None
    return study


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", type=Path, help="study YAML (settings, seeds, common overrides)")
    p.add_argument("-o", "--out", type=Path, help="study folder (default outputs/study/<study file name>)")
    p.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings (the table keeps all done)")
    p.add_argument("--seeds", nargs="+", type=int, help="these seeds instead of the study file's (train and table)")
    p.add_argument("--jobs", type=int, help="runs at once (default: the study file's)")
    p.add_argument("--table-only", action="store_true", help="train nothing: the table of the runs already done")
    p.add_argument("--subject", help="test subject of study_translations.png (default: the first of the test list)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    study = read_study(args.study)
    if args.seeds:
        study.seeds = args.seeds
    out = args.out or REPO_ROOT / "outputs" / "study" / args.study.stem
    unknown = [name for name in args.only or [] if name not in study.settings]
    if unknown:
        raise ConfigError(f"--only {unknown[0]}: no such setting in {args.study}; "
                          f"settings: {', '.join(study.settings)}")
    todo = [(name, seed) for name in (args.only or study.settings) for seed in study.seeds
            if not (out / name / f"seed{seed}" / "results" / "summary.csv").is_file()]
    if not args.table_only and todo:
        log.info("%d runs to train and evaluate, %d at once, %d thread(s) each", len(todo),
                 args.jobs or study.jobs, study.threads)
        with ThreadPoolExecutor(args.jobs or study.jobs) as pool:
            failed = [f"{name}/seed{seed}" for (name, seed), ok in
                      zip(todo, pool.map(lambda job: train_and_evaluate(study, out, *job), todo)) if not ok]
        if failed:
            log.warning("%d run(s) failed (see their stdout.log): %s", len(failed), ", ".join(failed))
    rows, curves = collect(study, out)
    if not rows:
        raise FileNotFoundError(f"no evaluated run in {out}")
    md = write_table(rows, out, study)
    plot_study(curves, out / "study.png")
    save_png(translations_figure(study, out, args.subject), out / "study_translations.png")
    print(md)


def trained(run_dir: Path) -> bool:
    """Whether the run folder holds a finished training (its last checkpoint says so)."""
    last = run_dir / "ckpt_last.pth"
    return last.is_file() and (run_dir / "ckpt_best.pth").is_file() and bool(read_checkpoint(last).get("finished"))


def train_and_evaluate(study: Study, out: Path, setting: str, seed: int) -> bool:
    """One run: train (from scratch; a partial run folder is replaced; a finished one is kept) and
    evaluate; False if either failed."""
    run_dir = out / setting / f"seed{seed}"
    done = trained(run_dir)
    if run_dir.exists() and not done:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = str(study.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    overrides = study.common + study.settings[setting] + [f"seed={seed}", f"out_dir={run_dir}"]
    train = [sys.executable, str(SCRIPTS / "train" / "train_brats_vq_seq2seq_2d.py"), "-d", "cpu",
             "-c", str(study.config), "--set", *overrides]
    test = [sys.executable, str(SCRIPTS / "test" / "test_brats_vq_2d_metrics.py"), "-d", "cpu",
            "-c", str(run_dir / "config.yaml"), "-l", str(run_dir / "ckpt_best.pth"), "-o", str(run_dir / "results"),
            "--overwrite", "--set", *study.evaluate]
    with (run_dir / "stdout.log").open("a") as logfile:
        for command in [test] if done else [train, test]:
            log.info("%s/seed%d: %s", setting, seed, Path(command[1]).name)
            if subprocess.run(command, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode != 0:
                return False
    return True


def collect(study: Study, out: Path) -> tuple[list[dict], dict[str, list]]:
    """A row per evaluated run (setting, seed, steps, minutes, the goal's numbers) and its validation curve."""
    rows, curves = [], {}
    for setting in study.settings:
        for seed in study.seeds:
            run_dir = out / setting / f"seed{seed}"
            summary = run_dir / "results" / "summary.csv"
            if not summary.is_file():
                continue
            steps, minutes = training_minutes(run_dir / "log.csv")
            rows.append({"setting": setting, "seed": seed, "steps": steps, "minutes": round(minutes, 2),
                         **goal_row(compare_with_copy(read_summary(summary)))})
            curves[f"{setting}/seed{seed}"] = validation_curve(run_dir / "log.csv")
    return rows, curves


FIGURE_PAIRS = [(0, 1), (0, 2), (0, 3), (2, 0), (2, 1), (2, 3)]
"""study_translations.png's columns (source, target): T1 and T2, whose tissue orders are each other's reverse."""


def translations_figure(study: Study, out: Path, subject: str | None) -> np.ndarray:
    """The centre slice of one test subject translated by the first evaluated seed of each setting
    (`vq.viz.settings_figure`); each row on its setting's own data (a 2 mm setting on the 2 mm phantom)."""
    rows, truth = {}, None
    for setting in study.settings:
        run_dir = next((out / setting / f"seed{seed}" for seed in study.seeds
                        if (out / setting / f"seed{seed}" / "results" / "summary.csv").is_file()), None)
        if run_dir is None:
            continue
        cfg = load_config(run_dir / "config.yaml")
        translator = load_translator(cfg, run_dir / "ckpt_best.pth", device="cpu")
        name = subject or read_list(cfg.lists_dir / "test.csv")[0][0]
        cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
        cache.ensure([name])
        slices = {s: load_eval_stack(cache, name, s, 1) for s in range(N_SEQ)}  # (1, 1, crop, crop) centre slice
        truth = truth or {s: image[0, 0].numpy() for s, image in slices.items()}
        rows[setting] = {(s, t): translator.translate(slices[s], [s, t])[0, 0].cpu().numpy()
                         for s, t in FIGURE_PAIRS}
    return settings_figure(truth, rows, f"{name}: centre slice, real target on top, then each setting (first seed)")


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_table(rows: list[dict], out: Path, study: Study) -> str:
    write_csv(out / "study.csv", rows)
    n = rows[0]["translations"]
    lines = [f"Mean ± sample standard deviation over the seeds; {n} single-step translations per run "
             "(counts are out of that).", "",
             "| setting | seeds | steps | minutes | brain PSNR (copy) | brain SSIM | whole PSNR (copy) | "
             "contrast error | order kept | meets goal |", "|" + "---|" * 10]
    for setting in study.settings:
        runs = [r for r in rows if r["setting"] == setting]
        if not runs:
            continue
        cell = lambda key, fmt: "{0:{f}} ± {1:{f}}".format(*mean_spread([r[key] for r in runs]), f=fmt)
        copy = lambda key: statistics.fmean(r[key] for r in runs)
        lines.append(f"| {setting} | {len(runs)} | {cell('steps', '.0f')} | {cell('minutes', '.1f')} | "
                     f"{cell('psnr_brain', '.2f')} ({copy('copy_psnr_brain'):.2f}) | {cell('ssim_brain', '.3f')} | "
                     f"{cell('psnr', '.2f')} ({copy('copy_psnr'):.2f}) | {cell('contrast_error', '.3f')} | "
                     f"{cell('order_kept', '.1f')} | {cell('meets_goal', '.1f')} |")
    md = "\n".join(lines) + "\n"
    write_atomic(out / "study.md", lambda f: f.write(md.encode()))
    return md


if __name__ == "__main__":
    sys.exit(main())
