"""Evaluate a trained model on the test list as the paper does (docs/method.md, "Evaluation protocol").

    python publications/src/vq/test/test_brats_vq_2d_metrics.py -d cuda:0 \
        -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        -l outputs/ckpt/vqseq2seq/brats/2d/ckpt_best.pth -o outputs/results/vq_seq2seq/brats/2d/

Writes OUT_DIR/result_metrics.csv (model), baseline_metrics.csv (copy the source),
tissue_contrast.csv (per tissue, where a label map exists), summary.csv and summary.md
(Table-1 layout, then inside the brain), figures/<ID>.png (source, prediction and real
target of every translation) and nifti/<ID>/ predictions in the source files' own geometry.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vq.cli import add_model_args, open_test_run, run_main
from vq.evaluation import evaluate, summary_markdown
from vq.metrics import LPIPSMetric

log = logging.getLogger("test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--list", default="test.csv", help="data list in data.lists (default test.csv)")
    p.add_argument("--lpips-weights", help="AlexNet ImageNet weights file for LPIPS (else test.lpips_weights)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in OUT_DIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    test = open_test_run(args, "result_metrics.csv")
    lpips = LPIPSMetric.try_create(args.lpips_weights or test.cfg.test.lpips_weights, device=test.translator.device)
    summary = evaluate(test, lpips)
    log.info("wrote %s", test.out)
    print(summary_markdown(summary))


if __name__ == "__main__":
    sys.exit(main())
