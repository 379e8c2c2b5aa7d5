"""Benchmark the training step and inference of a config on one device.

    python publications/src/vq/tools/benchmark.py -d cpu -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        [--json FILE] [--steps 5 --warmup 2] [--skip-fp32] [--set key=value ...]
    python publications/src/vq/tools/benchmark.py -d cuda -c CONFIG [CONFIG ...] --compare [--batches 1 32] \
        [--json FILE] [--steps 5 --warmup 2]
    python publications/src/vq/tools/benchmark.py -d cpu -c CONFIG --profile compiled [-o DIR] [--rows 30] [--steps 1]

After warm-up, times the full training step (all terms of the recipe on) and
inference (encode + decode a batch) at the config's crop and batch sizes, in fp32
and in mixed precision (bf16 autocast; fp16 on CUDA without bf16); counts the
model FLOPs per slice; measures the device's peak with large matmuls; and, when
`data.root` holds BraTS-layout data, times the reference's way to train (fp32,
batch 1, NIfTI read every step) and the DataLoader's share of a real loop.
Prints a table; `--json` writes the numbers.

`--compare` instead times the training step and inference of each config eager,
compiled (torch.compile) and replayed from a CUDA graph (CUDA only; skipped with a
note elsewhere), at each batch size (default: the config's train.batch_size for
training, test.batch_size for inference), in the precision train.amp=auto picks;
first call (compilation or capture) and steady state apart. It writes the JSON
(default asset/benchmarks/modes-DEVICE.json) and the markdown table beside it (.md).
`--profile MODE` profiles the training step in one of those modes (eager,
eager_sync_free, compiled, compiled_host_grouped, graphed) after its first call and
the warm-up: the --rows operators with the most self time, printed and written to
DIR/profile-CONFIG-MODE-DEVICE.txt (default DIR: asset/benchmarks).
Whether mixed precision trains as well as fp32 is an experiment, not a timing:
`amp_check.py`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from vq.bench import (TRAIN_MODES, Options, compare_modes, format_table, machine_line, modes_table,
                      perceptual_for, profile_train_mode, run)
from vq.cli import add_set_arg, run_main
from vq.config import REPO_ROOT, load_config
from vq.runtime import DeviceError, amp_dtype, resolve_device

log = logging.getLogger("benchmark")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("-c", "--config", required=True, nargs="+", help="YAML config (several with --compare)")
    p.add_argument("--json", type=Path, help="write the numbers to this file")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--skip-fp32", action="store_true", help="time mixed precision only")
    p.add_argument("--compare", action="store_true", help="eager vs compiled vs CUDA graph, see above")
    p.add_argument("--batches", type=int, nargs="+",
                   help="batch sizes of --compare (default: the config's train.batch_size and test.batch_size)")
    p.add_argument("--profile", choices=list(TRAIN_MODES), metavar="MODE",
                   help=f"profile the training step in this mode ({', '.join(TRAIN_MODES)}), see above")
    p.add_argument("-o", "--out-dir", type=Path,
                   help="where --profile writes its table (default: asset/benchmarks)")
    p.add_argument("--rows", type=int, default=30, help="operators in the --profile table (default 30)")
    p.add_argument("--peak-size", type=int, default=4096, help="n of the n x n x n peak matmuls")
    add_set_arg(p)
    args = p.parse_args(argv)
    for name in ("steps", "peak_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if len(args.config) > 1 and not args.compare:
        p.error("several configs only with --compare")
    if args.profile and (args.compare or args.json or args.skip_fp32):
        p.error("--profile runs alone: run --compare, --json or --skip-fp32 separately")
    if not args.profile and (args.out_dir or args.rows != 30):
        p.error("-o/--out-dir and --rows go with --profile")
    if args.rows < 1:
        p.error("--rows must be >= 1")
    if args.batches and (not args.compare or min(args.batches) < 1):
        p.error("--batches takes sizes >= 1, with --compare")
    return args


def run_benchmark(args: argparse.Namespace) -> int:
    configs = [load_config(path, args.set) for path in args.config]
    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"the benchmark runs on cpu or cuda, not {device}")
    mixed = amp_dtype(device, "auto")  # None on a CPU without bf16 units: fp32 is how it trains
    if args.compare:
        return compare(args, configs, device, mixed)
    if args.profile:
        return profile(args, configs[0], device, mixed)
    options = Options(steps=args.steps, warmup=args.warmup, skip_fp32=args.skip_fp32, peak_size=args.peak_size)
    result, notes = run(configs[0], args.config[0], device, mixed, options)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result, notes))
    return 0


def main(argv=None) -> int:
    return run_main(run_benchmark, parse_args(argv), log)


def compare(args, configs: list, device: torch.device, amp: torch.dtype | None) -> int:
    out = args.json or REPO_ROOT / "asset" / "benchmarks" / f"modes-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for path, cfg in zip(args.config, configs):
        record = compare_modes(cfg, Path(path).name, device, amp, args.batches, args.steps, args.warmup)
        records.append(record)
        # written after each config: a long run on a slow machine keeps what it measured
        out.write_text(json.dumps({"records": records}, indent=1))
        notes = [f"note ({r['config']}): {n}" for r in records for n in r["notes"]]
        table = "\n".join([f"{machine_line(device, amp)} | --steps {args.steps} --warmup {args.warmup}", "",
                           modes_table(records), "", *notes])
        out.with_suffix(".md").write_text(table + "\n")
    print(table)
    log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return 0


def profile(args, cfg, device: torch.device, amp: torch.dtype | None) -> int:
    if args.profile == "graphed" and device.type != "cuda":
        raise DeviceError(f"--profile graphed needs a CUDA device (this is {device})")
    perceptual, note = perceptual_for(cfg, device)
    table = profile_train_mode(cfg, device, amp, perceptual, args.profile, args.steps, args.warmup, args.rows)
    config = Path(args.config[0]).name
    overrides = f" --set {' '.join(args.set)}" if args.set else ""
    head = (f"{machine_line(device, amp)} | {config}, training step, {args.profile}, "
            f"batch {cfg.train.batch_size}, --steps {args.steps} --warmup {args.warmup}{overrides}\nnote: {note}")
    out_dir = args.out_dir or REPO_ROOT / "asset" / "benchmarks"
    out = out_dir / f"profile-{Path(config).stem}-{args.profile}-{device.type}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{head}\n\n{table}\n")
    print(f"{head}\n\n{table}")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
