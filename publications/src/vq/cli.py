"""What every script shares: common flags, loading a trained model, opening a test run, errors for people.

A user error (bad config key, missing file, broken subject, unavailable device,
missing weights, results already there) ends as one logged line and exit code 2,
never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
from pathlib import Path
from typing import Callable

from vq.checkpoint import CheckpointError, load_trained_model  # noqa: F401 (part of the scripts' toolkit)
from vq.config import ConfigError, load_config, resolve_path
from vq.dataloader.brats import BratsDataError, SliceCache
from vq.dataloader.lists import DataListError, read_list
from vq.evaluation import TestRun
from vq.inference import load_translator
from vq.dataloader.preprocess import IntensityError
from vq.nifti import NiftiError
from vq.runtime import DeviceError, resolve_device
from vq.weights import MissingWeightsError

USER_ERRORS = (ConfigError, DeviceError, IntensityError, BratsDataError, DataListError, NiftiError, CheckpointError,
               MissingWeightsError, FileExistsError, FileNotFoundError)


def add_model_args(parser: argparse.ArgumentParser, out: bool = True) -> None:
    """The reference's flags: -d DEVICE -c CONFIG -l CHECKPOINT [-o OUT_DIR], plus --set."""
    parser.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("-c", "--config", required=True, help="YAML config the model was trained with")
    parser.add_argument("-l", "--load", required=True, help="checkpoint, e.g. RUN_DIR/ckpt_best.pth")
    if out:
        parser.add_argument("-o", "--out", required=True, help="output folder")
    add_set_arg(parser)


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE ...: config overrides; repeated --set flags add up (argparse keeps only the last)."""
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys (repeatable)")


def run_main(body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, log: logging.Logger) -> int:
    """Run a script body with logging set up; user errors become one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return body(args) or 0
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error("no space left on device writing %s; files written before are intact: free space and run "
                  "again (training: --resume RUN_DIR)", err.filename or "a file")
        return 2




def open_test_run(args: argparse.Namespace, result: str, n_subjects: int | None = None) -> TestRun:
    """What a test script does before its own work, from its flags (-c, --set, -o, --overwrite, -d, -l,
    --list): the config; a FileExistsError if OUT_DIR/`result` is there without --overwrite; the trained
    model's translator; the first `n_subjects` of the data list (all by default) with their slice cache,
    built where missing (a broken subject is an error, not a skip)."""
    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    if (out / result).exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite or choose another -o")
    translator = load_translator(cfg, args.load, device=resolve_device(args.device))
    root, data_list = resolve_path(cfg.data.root), cfg.lists_dir / args.list
    subjects = read_list(data_list)[:n_subjects]
    cache = SliceCache(resolve_path(cfg.data.cache_dir), root, cfg.data)
    cache.ensure([name for name, _ in subjects])
    return TestRun(cfg, translator, root, data_list, subjects, cache, out)
