"""Synthesise missing sequences for your own skull-stripped scans, from sources on any grids.

    python publications/src/vq/tools/synthesize.py -d cpu -c CONFIG -l CHECKPOINT \\
        --src t1 t1.nii.gz [--src flair flair.nii.gz ...] --tgt t1ce t2 -o OUT_DIR \\
        [--register] [--mask BRAIN_MASK] [--grid first|each|work] [--scale unit|source] [--fused-only] [--samples N]

Volumes are read in RAS+ and brought through their affines onto one working grid: the first
source's axes and field of view at 1 mm, the model's training spacing, axial slices along its
last axis (`vq.grid`). With --register the other sources are first aligned to the first (rigid,
Mattes mutual information), each transform written as OUT/<seq>_to_<first>.tfm. There each
source is normalised as in training (`vq.dataloader.preprocess`; with --mask, inside the mask)
and translated slice by slice; the predictions are resampled onto the first source's grid
(--grid first, the default), onto each source's grid (each: files <name>_on_<seq>) or written
on the working grid (work).

Outputs: <tgt>_from_<src> per source (not with --fused-only); with several sources <tgt>_fused (the mean of their
latents, each position counting the sources that imaged it); with --samples N, <tgt>_mean and
<tgt>_std (N latents drawn around that mean, VQC sampling, docs/method.md step 3; sample std over
the draws). Intensities in [0, 1] (1 = the normalisation clip point), or with --scale source in
the source's own units (times its clip point; the first source's for fused, mean and std).
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
import torch.nn.functional as F

from vq.cli import add_model_args, load_translator, run_main
from vq.config import load_config
from vq.dataloader.preprocess import clip_value, prepare
from vq.grid import coverage, grid_of, register_rigid, resample, working_grid
from vq.inference import from_slices, fuse, to_slices
from vq.nifti import NiftiError, load_volume, save_like, to_intensity
from vq.runtime import resolve_device
from vq.sequences import SEQUENCES, seq_index

log = logging.getLogger("synthesize")

SPACING = 1.0
"""mm: the working grid's spacing, the BraTS training data's."""
STRIPPED_MAX_FOREGROUND = 0.5
"""A skull-stripped scan is mostly background (BraTS: about 15% brain); above this share of non-zero voxels, warn."""


def sequence(name: str) -> int:
    try:
        return seq_index(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--src", nargs=2, action="append", required=True, metavar=("SEQ", "NIFTI"),
                   help=f"an available sequence ({', '.join(SEQUENCES)}) and its file; repeatable, the first sets the grid")
    p.add_argument("--tgt", nargs="+", required=True, type=sequence, help="sequences to synthesise")
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
    except ValueError as err:
        p.error(f"--src: {err}")
    seqs = [s for s, _ in args.src]
    if len(set(seqs)) < len(seqs):
        p.error(f"--src: {SEQUENCES[max(seqs, key=seqs.count)]} is given twice; give each sequence once")
    return args


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), log)


def align(sources: dict, register: bool, out: Path, seed: int) -> dict[int, np.ndarray]:
    """{seq: (4, 4) world matrix, first source's RAS point -> that source's}: identity, or registered."""
    (first_seq, first), *others = sources.items()
    world = {first_seq: np.eye(4)}
    for s, vol in others:
        world[s] = np.eye(4)
        if register:
            world[s], transform = register_rigid(first.data, grid_of(first), vol.data, grid_of(vol), seed)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{SEQUENCES[s]}_to_{SEQUENCES[first_seq]}.tfm"
            sitk.WriteTransform(transform, str(path))
            log.info("registered %s to %s; transform %s", vol.path.name, first.path.name, path)
    return world


def on_working_grid(sources: dict, world: dict, mask_path: Path | None):
    """Every source on the working grid. -> (grid, {seq: (X, Y, Z) raw}, {seq: (X, Y, Z) bool field of view},
    (X, Y, Z) bool brain mask or None)."""
    first = next(iter(sources.values()))
    work = working_grid(grid_of(first), SPACING)
    mask = None
    if mask_path is not None:
        mask_vol = load_volume(mask_path)
        mask = resample(mask_vol.data != 0, grid_of(mask_vol), work, order=0) > 0.5
        if not mask.any():
            raise NiftiError(f"{mask_path}: the mask does not overlap {first.path}; give a mask of the first source")
    data, seen, brain = {}, {}, mask
    for s, vol in sources.items():
        data[s] = resample(vol.data, grid_of(vol), work, world[s])
        seen[s] = coverage(grid_of(vol), work, world[s])
        if brain is None:  # the first source's non-zero voxels
            brain = data[s] != 0
        if not (seen[s] & brain).any():
            raise NiftiError(f"{vol.path}: no overlap with {first.path} in scanner coordinates; pass --register "
                             "if the scans are from different scanner visits, or check the file's affine")
        foreground = (vol.data != 0).mean()
        if mask is not None:
            data[s] *= mask
        elif foreground > STRIPPED_MAX_FOREGROUND:
            log.warning("%s: %.0f%% of the field of view is non-zero, so it does not look skull-stripped; the model "
                        "was trained on skull-stripped scans: pass --mask BRAIN_MASK or skull-strip it first "
                        "(e.g. HD-BET, SynthStrip)", vol.path, 100 * foreground)
    return work, data, seen, mask


def run(args) -> None:
    cfg = load_config(args.config, args.set)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    translator = load_translator(cfg, args.load, device=device)
    out = Path(args.out)
    sources = {s: load_volume(path) for s, path in args.src}
    first = next(iter(sources.values()))
    world = align(sources, args.register, out, args.seed)
    work, data, seen, mask = on_working_grid(sources, world, args.mask)
    multiple = 2 ** cfg.model.n_down
    latents, weights, clip = {}, {}, {}
    for s, volume in data.items():
        if args.scale == "source":
            clip[s] = clip_value(volume, cfg.data.percentile)
        model_input = prepare(volume, cfg.data.percentile, brain=mask, name=sources[s].path.name,
                              reference=translator.intensity_reference.get(SEQUENCES[s]))
        stack, size = to_slices(model_input, multiple)
        latents[s] = translator.encode(stack)  # (Z, D, X'/4, Y'/4)
        seen_stack, _ = to_slices(seen[s] * 2.0 - 1, multiple)  # (Z, 1, X', Y'), padding -1: not seen
        weights[s] = F.avg_pool2d((seen_stack + 1) / 2, multiple)  # (Z, 1, X'/4, Y'/4) share imaged
        log.info("encoded %s (%s) on the %s working grid, %d slices", SEQUENCES[s], sources[s].path.name,
                 "x".join(map(str, work.shape)), stack.shape[0])

    first_seq = next(iter(sources))
    if args.grid == "first":
        places = [("", first, grid_of(first), None)]
    elif args.grid == "each":
        places = [(f"_on_{SEQUENCES[s]}", v, grid_of(v), np.linalg.inv(world[s])) for s, v in sources.items()]
    else:
        places = [("", nib.Nifti1Image(np.zeros(work.shape, np.uint8), work.affine), work, None)]

    def write(pred: torch.Tensor, stem: str, scale_of: int, intensity: bool = True) -> None:
        """pred (Z, 1, X', Y') on the working grid, in [-1, 1] (or [0, 1] without `intensity`) -> the output grids."""
        image = from_slices(pred, size)  # (X, Y, Z)
        image = to_intensity(image) if intensity else image
        if mask is not None:
            image = image * mask
        if args.scale == "source":
            image = image * clip[scale_of]
        for suffix, like, grid, to_work in places:
            path = save_like(resample(image, work, grid, to_work), like, out / f"{stem}{suffix}.nii.gz")
            log.info("wrote %s", path)

    per_source = {} if args.fused_only and len(latents) > 1 else latents
    mean = fuse(list(latents.values()), list(weights.values()))
    # sigma of docs/method.md step 3; 0 for a single source
    spread = ((torch.stack(list(latents.values())) - mean) ** 2).sum(0) if args.samples > 0 else None
    for t in args.tgt:
        for s, latent in per_source.items():
            write(translator.decode(latent, t), f"{SEQUENCES[t]}_from_{SEQUENCES[s]}", s)
        if len(latents) > 1:
            write(translator.decode(mean, t), f"{SEQUENCES[t]}_fused", first_seq)
        if args.samples > 0:
            draws = torch.stack([translator.decode(mean + torch.randn_like(mean) * spread, t)
                                 for _ in range(args.samples)])
            draws = torch.from_numpy(to_intensity(draws.cpu().numpy()))  # each draw on the written [0, 1] scale
            write(draws.mean(0), f"{SEQUENCES[t]}_mean", first_seq, intensity=False)
            write(draws.std(0), f"{SEQUENCES[t]}_std", first_seq, intensity=False)


if __name__ == "__main__":
    sys.exit(main())
