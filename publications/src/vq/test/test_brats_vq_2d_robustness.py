"""Anti-interference (docs/method.md, "Claims of the paper beyond Table 1"): translate corrupted sources,
score the translations against the CLEAN targets.

    python publications/src/vq/test/test_brats_vq_2d_robustness.py -d cuda:0 \
        -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        -l outputs/ckpt/vqseq2seq/brats/2d/ckpt_best.pth -o outputs/results/vq_seq2seq/brats/2d/robustness \
        [--compare OTHER_CKPT [--compare-config OTHER_CFG]] [--subjects 20] [--slices 32]

For each test subject, every available source x every missing target (single step), the
source is corrupted by each kind of `vq.corruptions.CORRUPTIONS` at levels 1..3 (level 0:
clean); the method: `vq.robustness`. Writes OUT_DIR/robustness.csv (a row per model x corruption x level x translation;
corruption `none` is level 0), robustness.md (means, with the corrupted source's own PSNR
against the clean source) and robustness.png (PSNR against level, a panel per corruption).
Both models of --compare see the very same corrupted inputs.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vq import robustness
from vq.cli import add_model_args, load_translator, open_test_run, run_main
from vq.config import ConfigError, load_config
from vq.metrics import LPIPSMetric

log = logging.getLogger("robustness")


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


def run(args) -> None:
    test = open_test_run(args, "robustness.csv", args.subjects)
    if args.slices and args.slices > test.cfg.data.n_slices:
        raise ConfigError(f"--slices {args.slices} exceeds data.n_slices={test.cfg.data.n_slices}")
    device = test.translator.device
    configs, checkpoints, translators = [test.cfg], [args.load], [test.translator]
    if args.compare:
        configs.append(load_config(args.compare_config or args.config, args.set))
        checkpoints.append(args.compare)
        translators.append(load_translator(configs[-1], args.compare, device=device))
    models = dict(zip(robustness.model_labels(configs, checkpoints), translators))
    lpips = LPIPSMetric.try_create(args.lpips_weights or test.cfg.test.lpips_weights, device=device)
    table = robustness.run(test, models, lpips, args.slices)
    log.info("wrote %s", test.out)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
