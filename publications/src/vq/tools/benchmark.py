"""Benchmark the training step and inference of one or more configs on one device.

    python publications/src/vq/tools/benchmark.py -d cpu -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        [--modes eager compiled graphed | all] [--precision fp32 mixed] [--batches 1 32] [--steps 5 --warmup 2] \
        [--json FILE] [--set key=value ...]
    python publications/src/vq/tools/benchmark.py -d cpu -c CONFIG --profile compiled [-o DIR] [--rows 30]

Times, after a first call and a warm-up, the full training step (every term of the recipe on, the
optimizer step included) and inference (encode + decode a batch through `Translator`) at the config's
crops and batch sizes (or --batches), in each mode (--modes: eager, eager_sync_free, compiled,
compiled_host_grouped, graphed; inference runs eager and compiled) and precision (fp32, and "mixed":
what train.amp=auto picks; a CPU without bf16 units trains in fp32, so there "mixed" is left out).
Counts model FLOPs per slice and measures the device's matmul peak, for the utilisation. Prints a
markdown table; --json writes the records and the table beside them (.md).
`--profile MODE` instead lists the training step's operators by self time, printed and written to
DIR/profile-CONFIG-MODE-DEVICE.txt (default DIR: asset/benchmarks).
Whether mixed precision trains as well as fp32 is an experiment, not a timing: `amp_check.py`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vq.bench import TRAIN_MODES, machine, measure, profile, table
from vq.cli import add_set_arg, run_main
from vq.config import REPO_ROOT, load_config
from vq.runtime import DeviceError, amp_dtype, resolve_device

log = logging.getLogger("benchmark")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("-c", "--config", required=True, nargs="+", help="YAML config(s)")
    p.add_argument("--modes", nargs="+", choices=[*TRAIN_MODES, "all"],
                   help="training-step modes (default eager; all: every mode)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "mixed"], help="default: fp32 and mixed")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: train.batch_size, test.batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first, before the timed ones")
    p.add_argument("--peak-size", type=int, help="n of the n x n x n peak matmuls (default 4096)")
    p.add_argument("--json", type=Path, help="write the records here and the table beside it (.md)")
    p.add_argument("--profile", choices=list(TRAIN_MODES), metavar="MODE", help="profile the training step")
    p.add_argument("-o", "--out-dir", type=Path, help="where --profile writes (default asset/benchmarks)")
    p.add_argument("--rows", type=int, default=30, help="operators in the --profile table")
    add_set_arg(p)
    args = p.parse_args(argv)
    if min(args.steps, args.peak_size or 1, args.rows, *(args.batches or [1])) < 1 or args.warmup < 0:
        p.error("--steps, --peak-size, --rows and --batches must be >= 1, --warmup >= 0")
    if args.profile and (len(args.config) > 1 or args.json or args.modes or args.precision or args.batches
                         or args.peak_size):
        p.error("--profile runs alone: one config, without --json, --modes, --precision, --batches, --peak-size")
    if not args.profile and (args.out_dir or args.rows != 30):
        p.error("-o/--out-dir and --rows go with --profile")
    modes = args.modes or ["eager"]
    args.modes, args.precision = list(TRAIN_MODES) if "all" in modes else modes, args.precision or ["fp32", "mixed"]
    args.peak_size = args.peak_size or 4096
    return args


def run_benchmark(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"the benchmark runs on cpu or cuda, not {device}")
    mixed = amp_dtype(device, "auto")  # None on a CPU without bf16 units: fp32 is how it trains
    if args.profile:
        return write_profile(args, device, mixed)
    if mixed is None and "mixed" in args.precision:
        if args.precision == ["mixed"]:
            raise DeviceError("--precision mixed: this CPU has no bf16 units, so train.amp=auto trains in fp32")
        log.info("no bf16 units on this CPU: train.amp=auto trains in fp32, so 'mixed' is left out")
    precisions = {label: amp for label, amp in (("fp32", None), ("mixed", mixed))
                  if label in args.precision and (label == "fp32" or amp is not None)}
    records = []
    for path in args.config:
        cfg = load_config(path, args.set)
        records.append(measure(cfg, Path(path).name, device, precisions, args.modes, args.batches, args.steps,
                               args.warmup, args.peak_size))
        if args.json:  # after each config: a long run on a slow machine keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"records": records}, indent=1))
            args.json.with_suffix(".md").write_text(table(records) + "\n")
    print(table(records))
    return 0


def write_profile(args: argparse.Namespace, device, amp) -> int:
    cfg, config = load_config(args.config[0], args.set), Path(args.config[0]).stem
    if args.profile == "graphed" and device.type != "cuda":
        raise DeviceError(f"--profile graphed needs a CUDA device (this is {device})")
    ran = machine(device)
    overrides = f" --set {' '.join(args.set)}" if args.set else ""
    head = (f"{ran['device']} | {ran['cpu']} | torch {ran['torch']}, {ran['threads']} threads, "
            f"{str(amp).replace('torch.', '') if amp else 'fp32'} | {config}, training step, {args.profile}, "
            f"batch {cfg.train.batch_size}, --steps {args.steps} --warmup {args.warmup}{overrides}")
    text = f"{head}\n\n{profile(cfg, device, amp, args.profile, args.steps, args.warmup, args.rows)}\n"
    out = (args.out_dir or REPO_ROOT / "asset" / "benchmarks") / f"profile-{config}-{args.profile}-{device.type}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log.info("wrote %s", out)
    return 0


def main(argv=None) -> int:
    return run_main(run_benchmark, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
