"""Synthesise missing sequences for your own skull-stripped scans.

    python publications/src/vq/tools/synthesize.py -d cpu -c CONFIG -l CHECKPOINT \
        --src t1 path/to/t1.nii.gz [--src t2 path/to/t2.nii.gz] --tgt t1ce flair -o OUT_DIR [--samples N]

Any size and orientation: volumes are read in RAS+, normalised as in training
(`vq.dataloader.preprocess`), translated slice by slice (all axial slices, full
size, padded to a multiple of 4) and written in the first source's geometry.
Outputs are in [0, 1] (1 = the source's normalisation clip point).
With several sources, `<tgt>_fused` decodes the mean of their latent codes.
With --samples N, N latents drawn around that mean (VQC sampling, docs/method.md
step 3) give `<tgt>_mean` and `<tgt>_std` (sample std over the draws, N >= 2), a per-voxel
uncertainty map.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from vq.cli import add_model_args, load_trained_model, run_main
from vq.config import load_config
from vq.dataloader.preprocess import normalize
from vq.inference import Translator, from_slices, to_slices
from vq.nifti import NiftiError, load_volume, save_like, to_intensity
from vq.runtime import amp_dtype, resolve_device
from vq.sequences import SEQUENCES, seq_index

log = logging.getLogger("synthesize")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--src", nargs=2, action="append", required=True, metavar=("SEQ", "NIFTI"),
                   help=f"an available sequence ({', '.join(SEQUENCES)}) and its file; repeatable")
    p.add_argument("--tgt", nargs="+", required=True, type=seq_index, help="sequences to synthesise")
    p.add_argument("--samples", type=int, default=0,
                   help="latent samples (2 or more) for a mean/std uncertainty map; std over the N draws, ddof 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent samples")
    args = p.parse_args(argv)
    if args.samples == 1 or args.samples < 0:
        p.error(f"--samples must be 0 (no sampling) or at least 2 (a std needs two draws), got {args.samples}")
    try:
        args.src = [(seq_index(name), path) for name, path in args.src]
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    cfg = load_config(args.config, args.set)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    translator = Translator(load_trained_model(cfg, args.load, device), device, amp_dtype(device, cfg.test.amp), cfg.test.batch_size)
    targets = args.tgt
    sources = {s: load_volume(path) for s, path in args.src}
    first = next(iter(sources.values()))
    for vol in sources.values():
        if vol.data.shape != first.data.shape:
            raise NiftiError(f"{vol.path}: shape {vol.data.shape} differs from {first.path} {first.data.shape}; "
                             "register the sequences to one grid first")
    out = Path(args.out)
    multiple = 2 ** cfg.model.n_down
    latents = {}
    for s, vol in sources.items():
        stack, size = to_slices(normalize(vol.data, cfg.data.percentile), multiple)
        latents[s] = translator.encode(stack)  # (Z, D, X'/4, Y'/4)
        log.info("encoded %s (%s), %d slices", SEQUENCES[s], vol.path.name, stack.shape[0])

    def write(pred: torch.Tensor, stem: str, intensity: bool = True) -> None:
        data = from_slices(pred, size)
        path = save_like(to_intensity(data) if intensity else data, first, out / f"{stem}.nii.gz")
        log.info("wrote %s", path)

    for t in targets:
        for s, latent in latents.items():
            write(translator.decode(latent, t), f"{SEQUENCES[t]}_from_{SEQUENCES[s]}")
        stacked = torch.stack(list(latents.values()))  # (n_src, Z, D, h, w)
        mean = stacked.mean(0)
        if len(latents) > 1:
            write(translator.decode(mean, t), f"{SEQUENCES[t]}_fused")
        if args.samples > 0:
            spread = ((stacked - mean) ** 2).sum(0)  # sigma of docs/method.md step 3; 0 for a single source
            draws = torch.stack([translator.decode(mean + torch.randn_like(mean) * spread, t)
                                 for _ in range(args.samples)])
            draws = torch.from_numpy(to_intensity(draws.cpu().numpy()))  # each draw on the written [0, 1] scale
            write(draws.mean(0), f"{SEQUENCES[t]}_mean", intensity=False)
            write(draws.std(0), f"{SEQUENCES[t]}_std", intensity=False)


if __name__ == "__main__":
    sys.exit(main())
