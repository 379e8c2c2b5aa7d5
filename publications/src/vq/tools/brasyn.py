"""BraSyn (BraTS missing-MRI synthesis): make a pseudo-validation set, complete it, score it.

    # drop one modality per complete case, as the challenge does (writes OUT/dropped.csv)
    python publications/src/vq/tools/brasyn.py drop --root COMPLETE_CASES -o DROPPED
    # synthesise each case's missing file under its own name (per-case folders, or --flat)
    python publications/src/vq/tools/brasyn.py complete -d cpu -c CONFIG -l CHECKPOINT --root DROPPED -o COMPLETED
    # score the completed files as the challenge does, with the copy-a-neighbour baseline beside them
    python publications/src/vq/tools/brasyn.py evaluate --completed COMPLETED --truth COMPLETE_CASES \
        --dropped DROPPED/dropped.csv -o RESULTS

Case folders use BraSyn naming (BraTS-GLI-XXXXX-YYY-{t1n,t1c,t2w,t2f}.nii.gz) or BraTS2021 naming.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vq.brasyn import BrasynError, complete_folder, drop_modalities, evaluate_folder, summary_markdown, write_results
from vq.cli import add_set_arg, load_translator, run_main
from vq.config import load_config
from vq.runtime import resolve_device

log = logging.getLogger("brasyn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    drop = sub.add_parser("drop", help="pseudo-validation set: one modality dropped per complete case")
    drop.add_argument("--root", required=True, type=Path, help="folder of complete case folders")
    drop.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    complete = sub.add_parser("complete", help="synthesise each case's missing modality")
    complete.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    complete.add_argument("-c", "--config", required=True, help="YAML config the model was trained with")
    complete.add_argument("-l", "--load", required=True, help="checkpoint, e.g. RUN_DIR/ckpt_best.pth")
    complete.add_argument("--root", required=True, type=Path, help="folder of cases with one modality missing")
    complete.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    complete.add_argument("--flat", action="store_true", help="all files in one folder (default: one per case)")
    add_set_arg(complete)
    evaluate = sub.add_parser("evaluate", help="score completed cases with the challenge's metrics")
    evaluate.add_argument("--completed", required=True, type=Path, help="output of `complete`")
    evaluate.add_argument("--truth", required=True, type=Path, help="the complete cases with segmentations")
    evaluate.add_argument("--dropped", required=True, type=Path, help="dropped.csv written by `drop`")
    evaluate.add_argument("-o", "--out", required=True, type=Path, help="results folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> int:
    try:
        if args.command == "drop":
            rows = drop_modalities(args.root, args.out)
            print(f"{len(rows)} cases written to {args.out}; dropped modalities in {args.out / 'dropped.csv'}")
        elif args.command == "complete":
            cfg = load_config(args.config, args.set)
            translator = load_translator(cfg, args.load, device=resolve_device(args.device))
            report = complete_folder(translator, args.root, args.out, args.flat, cfg.data.percentile)
            done = sum(text.endswith("written") for text in report.values())
            print(f"{done} of {len(report)} cases completed into {args.out}")
            return 0 if done == len(report) else 1
        else:
            rows, summary = evaluate_folder(args.completed, args.truth, args.dropped)
            write_results(rows, summary, args.out)
            print(summary_markdown(summary))
    except BrasynError as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
