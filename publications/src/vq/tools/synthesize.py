"""Synthesise missing sequences for your own skull-stripped scans, from sources on any grids.

    python publications/src/vq/tools/synthesize.py -d cpu -c CONFIG -l CHECKPOINT \\
        --src t1 t1.nii.gz [--src flair flair.nii.gz ...] --tgt t1ce t2 -o OUT_DIR \\
        [--register] [--mask BRAIN_MASK] [--grid first|each|work] [--scale unit|source] [--fused-only] [--samples N]

The sources go onto one 1 mm working grid (`vq.grid.on_working_grid`; with --register the others are
first aligned rigidly to the first, the transforms written as OUT/<seq>_to_<first>.tfm) and through
`vq.inference.synthesize_all`; the predictions are resampled onto the first source's grid (--grid first),
each source's (each: files <name>_on_<seq>) or written on the working grid (work).

Outputs: <tgt>_from_<src> per source (not with --fused-only); with several sources <tgt>_fused (the fused
latent, each position counting the sources that imaged it); with --samples N, <tgt>_mean and <tgt>_std over
N latents drawn around it (VQC sampling, docs/method.md step 3; std with ddof 1). Intensities in [0, 1]
(1 = the normalisation clip point), or with --scale source in the source's own units (times its clip point;
the first source's for fused, mean and std).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from vq.cli import add_model_args, load_translator, run_main
from vq.config import load_config
from vq.dataloader.preprocess import clip_value
from vq.grid import align, grid_of, on_working_grid, resample
from vq.inference import synthesize_all
from vq.nifti import load_volume, save_like, to_intensity
from vq.runtime import resolve_device
from vq.sequences import SEQUENCES, seq_index

log = logging.getLogger("synthesize")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--src", nargs=2, action="append", required=True, metavar=("SEQ", "NIFTI"),
                   help=f"an available sequence ({', '.join(SEQUENCES)}) and its file; repeatable, the first sets the grid")
    p.add_argument("--tgt", nargs="+", required=True, help="sequences to synthesise")
    p.add_argument("--register", action="store_true",
                   help="rigidly align the other sources to the first (for scans of another scanner visit or with motion)")
    p.add_argument("--mask", type=Path, help="brain mask (non-zero = brain) on the first source's grid or aligned to it")
    p.add_argument("--grid", choices=("first", "each", "work"), default="first",
                   help="write outputs on the first source's grid, on each source's grid, or on the 1 mm working grid")
    p.add_argument("--scale", choices=("unit", "source"), default="unit",
                   help="unit: [0, 1]; source: in the source's intensity units (x its normalisation clip point)")
    p.add_argument("--fused-only", action="store_true", help="with several sources, write only the fused outputs")
    p.add_argument("--samples", type=int, default=0,
                   help="latent samples (2 or more) for a mean/std uncertainty map; std over the N draws, ddof 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent samples and of the registration")
    args = p.parse_args(argv)
    if args.samples == 1 or args.samples < 0:
        p.error(f"--samples must be 0 (no sampling) or at least 2 (a std needs two draws), got {args.samples}")
    try:
        args.src = [(seq_index(name), path) for name, path in args.src]
        args.tgt = [seq_index(name) for name in args.tgt]
    except ValueError as err:
        p.error(f"--src/--tgt: {err}")
    seqs = [s for s, _ in args.src]
    if len(set(seqs)) < len(seqs):
        p.error(f"--src: {SEQUENCES[max(seqs, key=seqs.count)]} is given twice; give each sequence once")
    return args


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def run(args) -> None:
    cfg = load_config(args.config, args.set)
    torch.manual_seed(args.seed)
    translator = load_translator(cfg, args.load, device=resolve_device(args.device))
    out = Path(args.out)
    sources = {s: load_volume(path) for s, path in args.src}
    (first_seq, first), many = next(iter(sources.items())), len(sources) > 1
    world, transforms = align(sources, args.register, args.seed)
    for s, transform in transforms.items():
        out.mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(transform, str(out / f"{SEQUENCES[s]}_to_{SEQUENCES[first_seq]}.tfm"))
    work, data, seen, mask = on_working_grid(sources, world, args.mask)
    log.info("translating %d source(s) on the %s working grid", len(data), "x".join(map(str, work.shape)))
    result = synthesize_all(translator, data, args.tgt, percentile=cfg.data.percentile, brain=mask, seen=seen,
                            names={s: v.path.name for s, v in sources.items()},
                            per_source=not (args.fused_only and many), samples=args.samples)
    clip = {s: clip_value(v, cfg.data.percentile) for s, v in data.items()} if args.scale == "source" else {}
    places = {"first": [("", first, grid_of(first), None)],
              "each": [(f"_on_{SEQUENCES[s]}", v, grid_of(v), np.linalg.inv(world[s])) for s, v in sources.items()],
              "work": [("", nib.Nifti1Image(np.zeros(work.shape, np.uint8), work.affine), work, None)]}[args.grid]

    def write(image: np.ndarray, stem: str, scale_of: int) -> None:
        """An (X, Y, Z) image on the working grid in [0, 1] -> the output grids, masked and scaled as asked."""
        image = image * (mask if mask is not None else 1) * clip.get(scale_of, 1.0)
        for suffix, like, grid, to_work in places:
            log.info("wrote %s", save_like(resample(image, work, grid, to_work), like, out / f"{stem}{suffix}.nii.gz"))

    for t in args.tgt:
        for s in sources:
            if (t, s) in result.per_source:
                write(to_intensity(result.per_source[t, s]), f"{SEQUENCES[t]}_from_{SEQUENCES[s]}", s)
        if many:
            write(to_intensity(result.fused[t]), f"{SEQUENCES[t]}_fused", first_seq)
        if args.samples:
            draws = to_intensity(result.draws[t])  # each draw on the written [0, 1] scale
            write(draws.mean(0), f"{SEQUENCES[t]}_mean", first_seq)
            write(draws.std(0, ddof=1), f"{SEQUENCES[t]}_std", first_seq)


if __name__ == "__main__":
    sys.exit(main())
