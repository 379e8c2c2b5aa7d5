"""Anti-interference (docs/method.md, "Claims of the paper beyond Table 1"): translate corrupted sources,
score the translations against the CLEAN targets.

    python publications/src/vq/test/test_brats_vq_2d_robustness.py -d cuda:0 \
        -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        -l outputs/ckpt/vqseq2seq/brats/2d/ckpt_best.pth -o outputs/results/vq_seq2seq/brats/2d/robustness \
        [--compare OTHER_CKPT [--compare-config OTHER_CFG]] [--subjects 20] [--slices 32]

For each test subject, every available source x every missing target (single step), the
source is corrupted by each kind of `vq.corruptions.CORRUPTIONS` at levels 1..3 (level 0:
clean). Writes OUT_DIR/robustness.csv (a row per model x corruption x level x translation;
corruption `none` is level 0), robustness.md (means, with the corrupted source's own PSNR
against the clean source) and robustness.png (PSNR against level, a panel per corruption).
Both models of --compare see the very same corrupted inputs.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vq.cli import add_model_args, load_trained_model, run_main
from vq.config import Config, ConfigError, load_config, resolve_path
from vq.corruptions import CORRUPTIONS, corrupt
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list
from vq.evaluation import Translator, score, write_metrics
from vq.metrics import LPIPSMetric, psnr
from vq.runtime import amp_dtype, resolve_device
from vq.sequences import N_SEQ, SEQUENCES, available, missing
from vq.viz import plt

log = logging.getLogger("robustness")

COLUMNS = ["model", "corruption", "level", "name", "src", "tgt", "psnr", "ssim", "lpips", "lpips_mean", "input_psnr"]
"""`lpips` is the per-volume sum over slices (as in result_metrics.csv), `input_psnr` the corrupted
source against the clean source (inf at level 0)."""
CLEAN = "none"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--compare", help="a second checkpoint to evaluate on the same corrupted inputs")
    p.add_argument("--compare-config", help="config of the --compare checkpoint (default: -c); --set applies "
                                            "to it too, the data settings come from -c")
    p.add_argument("--list", default="test.csv", help="data list in data.lists (default test.csv)")
    p.add_argument("--subjects", type=positive_int, help="only the first N subjects of the list")
    p.add_argument("--slices", type=positive_int, help="only the central N slices (default data.n_slices)")
    p.add_argument("--lpips-weights", help="AlexNet ImageNet weights file for LPIPS (else test.lpips_weights)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in OUT_DIR")
    args = p.parse_args(argv)
    if args.compare_config and not args.compare:
        p.error("--compare-config needs --compare")
    return args


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def load_translator(cfg: Config, checkpoint: str, device: torch.device) -> Translator:
    model = load_trained_model(cfg, checkpoint, device)
    return Translator(model, device, amp_dtype(device, cfg.test.amp), cfg.test.batch_size)


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


def run(args) -> None:
    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    if (out / "robustness.csv").exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite or choose another -o")
    if args.slices and args.slices > cfg.data.n_slices:
        raise ConfigError(f"--slices {args.slices} exceeds data.n_slices={cfg.data.n_slices}")
    device = resolve_device(args.device)
    configs, checkpoints = [cfg], [args.load]
    if args.compare:
        configs.append(load_config(args.compare_config or args.config, args.set))
        checkpoints.append(args.compare)
    models = dict(zip(model_labels(configs, checkpoints),
                      (load_translator(c, ckpt, device) for c, ckpt in zip(configs, checkpoints))))
    lpips = LPIPSMetric.try_create(args.lpips_weights or cfg.test.lpips_weights, device=device)

    subjects = read_list(cfg.lists_dir / args.list)[:args.subjects]
    cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
    cache.ensure([name for name, _ in subjects])
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name, code in tqdm(subjects, desc="subjects", dynamic_ncols=True):
        stacks = {s: load_eval_stack(cache, name, s, args.slices) for s in range(N_SEQ)}  # (S,1,crop,crop) each
        for src in available(code):
            for kind, level in conditions():
                gen = torch.Generator().manual_seed(stack_seed(cfg.seed, name, src, kind))
                source = corrupt(stacks[src], kind, level, gen) if level else stacks[src]
                input_psnr = float(psnr(source[:, 0], stacks[src][:, 0]))
                for label, translator in models.items():
                    latent = translator.encode(source)  # one encoding serves every target
                    for tgt in missing(code):
                        pred = translator.decode(latent, tgt)
                        rows.append({"model": label, "corruption": kind, "level": level, "name": name,
                                     "src": SEQUENCES[src], "tgt": SEQUENCES[tgt], "input_psnr": input_psnr,
                                     **score(pred, stacks[tgt].to(device), lpips)})
    write_rows(rows, out / "robustness.csv")
    table = markdown(rows, len(subjects), args.slices or cfg.data.n_slices)
    (out / "robustness.md").write_text(table)
    plot(rows, out / "robustness.png")
    log.info("wrote %s", out)
    print(table)


def write_rows(rows: list[dict], path: Path) -> None:
    write_metrics(rows, path, COLUMNS)


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


def plot(rows: list[dict], path: Path) -> None:
    """PSNR of the translation against level, one panel per corruption, one line per model;
    dashed: the corrupted input's PSNR against the clean source."""
    psnrs, inputs = means(rows, "psnr"), means(rows, "input_psnr")
    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(3.6 * len(CORRUPTIONS), 3.4), sharey=True)
    for ax, (kind, c) in zip(axes, CORRUPTIONS.items()):
        levels = range(len(c.levels) + 1)
        for i, model in enumerate(models):
            ax.plot(levels, [psnrs[(model, kind, lv)] for lv in levels], "o-", color=f"C{i}", label=model)
        ax.plot(levels[1:], [inputs[(models[0], kind, lv)] for lv in levels[1:]], "--", color="grey",
                label="corrupted input vs clean source")
        ax.set_xticks(list(levels), ["clean"] + [f"{s:g}" for s in c.levels])
        ax.set_title(kind)
        ax.set_xlabel("strength")
    axes[0].set_ylabel("PSNR vs clean target (dB)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
