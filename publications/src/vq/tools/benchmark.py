"""Benchmark the training step and inference of a config on one device.

    python publications/src/vq/tools/benchmark.py -d cpu -c publications/config/vq/vqseq2seq_brats_2d_missing_3_256.yaml \
        [--json FILE] [--steps 5 --warmup 2] [--skip-fp32] [--amp-check 300] [--set key=value ...]

After warm-up, times the full training step (all terms of the recipe on) and
inference (encode + decode a batch) at the config's crop and batch sizes, in fp32
and in mixed precision (bf16 autocast; fp16 on CUDA without bf16); counts the
model FLOPs per slice; measures the device's peak with large matmuls; and, when
`data.root` holds BraTS-layout data, times the reference's way to train (fp32,
batch 1, NIfTI read every step) and the DataLoader's share of a real loop.
Prints a table; `--json` writes the numbers. `--amp-check N` instead trains the
config's model N steps from one seed in fp32 and in mixed precision on the
config's data and prints both validation PSNRs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from vq.bench import Options, amp_check, format_table, run
from vq.cli import add_set_arg
from vq.config import ConfigError, load_config
from vq.dataloader.brats import BratsDataError
from vq.dataloader.lists import DataListError
from vq.runtime import DeviceError, amp_dtype, resolve_device
from vq.weights import MissingWeightsError

log = logging.getLogger("benchmark")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("-c", "--config", required=True, help="YAML config")
    p.add_argument("--json", type=Path, help="write the numbers to this file")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--skip-fp32", action="store_true", help="time mixed precision only")
    p.add_argument("--peak-size", type=int, default=4096, help="n of the n x n x n peak matmuls")
    p.add_argument("--amp-check", type=int, metavar="STEPS",
                   help="only compare validation PSNR after STEPS training steps in fp32 and mixed precision")
    add_set_arg(p)
    args = p.parse_args(argv)
    for name in ("steps", "peak_size", "amp_check"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        device = resolve_device(args.device)
        if device.type not in ("cpu", "cuda"):
            raise DeviceError(f"the benchmark runs on cpu or cuda, not {device}")
        mixed = amp_dtype(device, "auto")  # None on a CPU without bf16 units: fp32 is how it trains
        if args.amp_check:
            if mixed is None:
                log.warning("no bf16 units on this CPU: the check runs emulated bf16, much slower than fp32")
            psnr = amp_check(cfg, device, mixed or torch.bfloat16, args.amp_check)
            print(f"validation PSNR after {args.amp_check} steps: fp32 {psnr['fp32']:.3f} dB, "
                  f"mixed ({mixed}) {psnr['mixed']:.3f} dB, difference {psnr['mixed'] - psnr['fp32']:+.3f} dB")
            return 0
        options = Options(steps=args.steps, warmup=args.warmup, skip_fp32=args.skip_fp32, peak_size=args.peak_size)
        result, notes = run(cfg, args.config, device, mixed, options)
    except (ConfigError, DeviceError, BratsDataError, DataListError, MissingWeightsError,
            FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
