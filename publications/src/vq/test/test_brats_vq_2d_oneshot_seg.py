"""Semantic latent (docs/method.md, "Claims of the paper beyond Table 1"): one-shot tumour segmentation
through the common latent space.

    python publications/src/vq/test/test_brats_vq_2d_oneshot_seg.py -d cuda:0 \
        -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        -l outputs/ckpt/vqseq2seq/brats/2d/ckpt_best.pth -o outputs/results/vq_seq2seq/brats/2d/oneshot \
        [--support BraTS2021_00000] [--seq t1ce] [--query-seq flair]

ONE labelled subject (the support; default the first subject of the list with tumour labels in
its central slices) is encoded from one sequence (--seq); a k-nearest-neighbour classifier on its
latent vectors labels every latent position of every other subject, encoded from its own sequence
(the first available per its list code, or --query-seq), scored by Dice for whole tumour (labels
1, 2, 4), tumour core (1, 4) and enhancing tumour (4). The method: `vq.oneshot`.

Writes OUT_DIR/oneshot_seg.csv (name, seq, feature, wt, tc, et) and oneshot_seg.md (mean +- std).
"""
from __future__ import annotations

import argparse
import logging
import sys

from vq import oneshot
from vq.cli import add_model_args, open_test_run, run_main
from vq.sequences import seq_index

log = logging.getLogger("oneshot_seg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--support", help="ID of the labelled subject (default: first of the list with a tumour)")
    p.add_argument("--seq", default="t1ce", help="sequence of the support subject (default t1ce)")
    p.add_argument("--query-seq", help="sequence of every query subject (default: its first available one; "
                                       "the list's availability code is then ignored)")
    p.add_argument("--list", default="test.csv", help="data list in data.lists (default test.csv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the support-vector subset")
    p.add_argument("--overwrite", action="store_true", help="replace results already in OUT_DIR")
    args = p.parse_args(argv)
    for flag in ("seq", "query_seq"):
        try:
            if getattr(args, flag) is not None:
                setattr(args, flag, seq_index(getattr(args, flag)))
        except ValueError as err:
            p.error(f"--{flag.replace('_', '-')}: {err}")
    return args


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    test = open_test_run(args, "oneshot_seg.csv")
    table = oneshot.run(test, args.seq, args.support, args.query_seq, args.seed)
    log.info("wrote %s", test.out)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
