"""Check a dataset and its data lists as training and evaluation will, without training (no GPU).

    python publications/src/vq/tools/check_dataset.py -c CONFIG [--lists train valid test] [-o REPORT.csv]
        [--set data.root=... data.lists=...]

Every subject of each list is checked for the files its use reads (training subjects for their
two "missing"-setting sequences, validation and test subjects for all four): folder and files
present, each a readable 3D NIfTI, finite, not all zeros, the sequences of one subject of one
shape. Prints a table and writes the per-subject report (list, subject, code, status, reason);
the slice cache is built on the way, so a training run on a checked dataset starts at once.
Exit code 0: every subject usable; 1: some are not (see the report); 2: a config or list error.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vq.cli import add_set_arg, run_main
from vq.config import load_config, resolve_path
from vq.dataloader.brats import SliceCache
from vq.dataloader.check import check_lists
from vq.dataloader.lists import read_list

log = logging.getLogger("check_dataset")
LISTS = ("train", "valid", "test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", required=True, help="YAML config naming data.root and data.lists")
    p.add_argument("--lists", nargs="+", choices=LISTS, default=list(LISTS), help="lists to check (default all)")
    p.add_argument("-o", "--out", help="report CSV (default: data_check.csv in the config's cache_dir)")
    add_set_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> int:
    cfg = load_config(args.config, args.set)
    rows = {lst: read_list(cfg.lists_dir / f"{lst}.csv") for lst in args.lists}
    cache = SliceCache(resolve_path(cfg.data.cache_dir), resolve_path(cfg.data.root), cfg.data)
    with cache.locked():
        result = check_lists(cache, rows, cfg.data.missing)
    report = result.write(resolve_path(args.out) if args.out else cache.dir / "data_check.csv")
    print(result.table())
    if result.bad:
        print(result.summary(report))
        return 1
    print(f"all {result.n_rows} subjects usable; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
