"""A physics-based multi-sequence brain MRI phantom, written in BraTS2021 layout.

Anatomy is real: the MNI ICBM152 2009a 1 mm template (GM, WM and brain maps
shipped with nilearn), warped per subject by a global scale, a small rotation
and a smooth random displacement, so no two subjects share one anatomy.
Contrast is MR physics: each tissue has a proton density, T1 and T2 (3 T
literature values, jittered and textured per subject); each sequence's signal
equation is evaluated per tissue and mixed by the tissue fractions of the
voxel (partial volume). A BraTS-like tumour (necrosis 1, oedema 2, enhancing
rim 4) replaces tissue in 7 of 8 subjects; gadolinium shortens T1 of the
enhancing rim in T1Gd. Bias fields, Rician noise and per-subject gains follow.

    python publications/src/vq/tools/make_phantom_brats.py -o data/phantom -n 24 --seed 0

Every subject is seeded from (seed, index), so the output is byte-identical
for a seed whatever the number of workers.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from vq.dataloader.lists import SPLITS, make_lists
from vq.labels import BRATS_LABELS, TISSUE, TISSUE_LABELS
from vq.sequences import SEG, SEQUENCES, subject_file

log = logging.getLogger(__name__)

VERSION = 2
"""Bump when the generator changes, so that existing datasets are regenerated (2: tissue maps added;
the BraTS files of a seed are unchanged)."""
MANIFEST = "phantom.json"
SHAPE = (240, 240, 155)
"""BraTS grid: 240 x 240 x 155 voxels of 1 mm, axial slices along the last axis."""
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
"""BraTS2021's affine: voxels stored L->R and P->A flipped (LPS), world in RAS mm."""
NO_TUMOUR_EVERY = 8
"""Subjects with index % 8 == 7 have no tumour (about 1 in 8, as the issue asks)."""
LABELS = BRATS_LABELS


@dataclass(frozen=True)
class Tissue:
    pd: float  # proton density, relative to water
    t1: float  # ms, at 3 T
    t2: float  # ms


TISSUES = {
    "wm": Tissue(0.70, 830, 80),
    "gm": Tissue(0.80, 1330, 110),
    "csf": Tissue(1.00, 4000, 2000),
    "oedema": Tissue(0.88, 1800, 300),  # extra water: long T1 and T2
    "enhancing": Tissue(0.85, 1600, 140),  # cellular tumour, moderately long T1/T2
    "necrosis": Tissue(0.95, 3000, 1000),  # fluid-like
}

R1_GD = 4e-3
"""Gadolinium relaxivity r1 ~ 4 /(mM s) = 4e-3 /(mM ms) at 3 T."""


@dataclass(frozen=True)
class Acquisition:
    tr: float  # ms
    te: float  # ms
    ti: float | None = None  # inversion time (ms); None = spin echo
    gadolinium: bool = False


def flair_ti(tr: float, t1_csf: float = TISSUES["csf"].t1) -> float:
    """TI that nulls CSF: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0 (-> T1 ln 2 for TR >> T1)."""
    return t1_csf * np.log(2 / (1 + np.exp(-tr / t1_csf)))


ACQUISITIONS = {
    "t1": Acquisition(tr=500, te=10),  # short TR/TE: T1 weighting
    "t1ce": Acquisition(tr=500, te=10, gadolinium=True),
    "t2": Acquisition(tr=5000, te=100),  # long TR/TE: T2 weighting
    "flair": Acquisition(tr=9000, te=100, ti=flair_ti(9000)),
}
assert tuple(ACQUISITIONS) == SEQUENCES


def signal(pd, t1, t2, acq: Acquisition):
    """Spin-echo or inversion-recovery signal (magnitude) of one tissue."""
    e1 = np.exp(-acq.tr / t1)
    if acq.ti is None:
        mz = 1 - e1
    else:
        mz = np.abs(1 - 2 * np.exp(-acq.ti / t1) + e1)
    return pd * mz * np.exp(-acq.te / t2)


# ---------------------------------------------------------------- anatomy

@dataclass(frozen=True)
class Template:
    brain: np.ndarray  # (X, Y, Z) float32 maps cropped to the brain's bounding box
    gm: np.ndarray
    wm: np.ndarray
    centre: np.ndarray  # (3,) brain centre in voxels of the cropped maps
    half_size: np.ndarray  # (3,) half the brain's extent, voxels


@functools.lru_cache(maxsize=1)
def template() -> Template:
    """The MNI ICBM152 2009a 1 mm maps from nilearn (shipped with it, no download)."""
    from nilearn import datasets  # slow import; only where the template is needed

    maps = [np.asarray(load(resolution=1).get_fdata(), np.float32) for load in (
        datasets.load_mni152_brain_mask, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template)]
    inside = np.argwhere(maps[0] > 0)
    lo, hi = np.maximum(inside.min(0) - 2, 0), inside.max(0) + 3  # margin keeps edges interpolating to 0
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain, gm, wm = (np.ascontiguousarray(m[crop]) for m in maps)
    return Template(brain, gm, wm, centre=(inside.min(0) + inside.max(0)) / 2 - lo,
                    half_size=(inside.max(0) - inside.min(0)) / 2)


def _noise(rng: np.random.Generator, spacing: float) -> np.ndarray:
    """Smooth unit-std noise on a coarse grid, one node every `spacing` mm over SHAPE."""
    nodes = rng.standard_normal([int(np.ceil(s / spacing)) + 2 for s in SHAPE], dtype=np.float32)
    nodes = ndi.gaussian_filter(nodes, 1.0)  # smooth across nodes so linear interpolation looks smooth
    return nodes / nodes.std()


def _at(nodes: np.ndarray, spacing: float, vox: np.ndarray) -> np.ndarray:
    """Coarse-grid field at output voxel coordinates vox (3, ...): cheaper than full-res filtering."""
    return ndi.map_coordinates(nodes, vox / np.float32(spacing), order=1, mode="nearest")


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warp(rng: np.random.Generator, tpl: Template) -> np.ndarray:
    """Template voxel coordinates (3, X, Y, Z) of every output voxel: this subject's anatomy."""
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, 3)  # subject size / template size, per axis
    rot = _rotation(np.deg2rad(rng.uniform(-4, 4, 3)))
    to_template = (np.diag(1 / scale) @ rot).astype(np.float32)
    grid = np.indices(SHAPE, dtype=np.float32)  # (3, X, Y, Z)
    centre = (np.array(SHAPE, np.float32) - 1) / 2
    # a large brain does not fit 155 slices: keep the vertex inside, cut the brainstem (as BraTS does)
    centre[2] = min(centre[2], SHAPE[2] - 6 - tpl.half_size[2] * scale[2])
    coords = np.einsum("ij,j...->i...", to_template, grid - centre[:, None, None, None])
    coords += tpl.centre.astype(np.float32)[:, None, None, None]
    amplitude = rng.uniform(2, 4)  # mm, std of the smooth displacement
    for axis in range(3):
        coords[axis] += amplitude * _at(_noise(rng, 24), 24, grid)
    return coords


# ---------------------------------------------------------------- tumour

def _soft(g: np.ndarray, threshold: float, width: float) -> np.ndarray:
    """Fraction of a voxel beyond a level set of g: a linear ramp `width` wide (partial volume)."""
    return np.clip((g - threshold) / width + 0.5, 0, 1)


def _add_tumour(rng, vox: np.ndarray, frac: dict, seg: np.ndarray) -> None:
    """Grow a BraTS-like tumour in place: fractions replaced, labels written to seg.

    g = 1 - d * exp(n), d the ellipsoidal distance to the centre, n smooth
    noise: g = 1 at the centre, 0 on an irregular oedema boundary; the core
    (enhancing + necrosis) and the necrosis are higher level sets of g (plus
    a little noise of their own).
    """
    deep_wm = np.flatnonzero(frac["wm"] > 0.9)
    centre = vox[:, rng.choice(deep_wm)]
    axes = rng.uniform(18, 35) * rng.uniform(0.75, 1.25, 3)  # mm, semi-axes of the oedema
    near = np.flatnonzero(np.all(np.abs(vox - centre[:, None]) < 1.6 * axes[:, None], axis=0))
    rel = (vox[:, near] - centre[:, None]) / axes[:, None].astype(np.float32)
    # two noise scales: lobulated outline (8 mm) with finger-like oedema (4 mm)
    lobes = 0.35 * _at(_noise(rng, 8), 8, vox[:, near]) + 0.2 * _at(_noise(rng, 4), 4, vox[:, near])
    g = 1 - np.sqrt((rel**2).sum(0)) * np.exp(lobes)
    g_core = g + 0.1 * _at(_noise(rng, 6), 6, vox[:, near])  # rim of uneven thickness
    parenchyma = frac["wm"][near] + frac["gm"][near]
    core_t = rng.uniform(0.15, 0.4)
    necrosis_t = core_t + rng.uniform(0.1, 0.25)
    width = 1.5 / axes.mean()  # ~1.5 mm partial-volume ramp, in units of g

    core, necrosis = _soft(g_core, core_t, width), _soft(g_core, necrosis_t, width)
    oedema_w = np.maximum(_soft(g, 0.0, width), core)
    normal = {t: frac[t][near] * (1 - core) for t in ("wm", "gm", "csf")}
    # oedema is water in parenchyma: it takes over WM and GM, not CSF
    oedema = oedema_w * (normal["wm"] + normal["gm"])
    for t in ("wm", "gm"):
        normal[t] *= 1 - oedema_w
    for t, values in {**normal, "oedema": oedema, "enhancing": core - necrosis, "necrosis": necrosis}.items():
        frac.setdefault(t, np.zeros_like(frac["wm"]))[near] = values

    labels = np.zeros(len(near), np.uint8)
    labels[(g > 0) & (parenchyma > 0.5)] = LABELS["oedema"]
    labels[g_core > core_t] = LABELS["enhancing"]
    labels[g_core > necrosis_t] = LABELS["necrosis"]
    seg[near] = labels


# ---------------------------------------------------------------- acquisition

def _bias(rng, vox: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias: a random degree-2 polynomial, peak deviation 10-20%."""
    u = (vox - vox.mean(1, keepdims=True)) / np.float32(100)  # ~[-1, 1] over the brain
    terms = [u[0], u[1], u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2, u[0] * u[1], u[0] * u[2], u[1] * u[2]]
    field = sum(np.float32(c) * t for c, t in zip(rng.standard_normal(len(terms)), terms))
    field -= field.mean()
    return 1 + rng.uniform(0.1, 0.2) * field / np.abs(field).max()


def _acquire(rng, vox: np.ndarray, frac: dict, gd_mM: float) -> dict[str, np.ndarray]:
    """Signals of the four sequences at the brain voxels (int16, WM about 1000)."""
    texture = {p: 1 + np.float32(rng.uniform(0.03, 0.06)) * _at(_noise(rng, 4), 4, vox)
               for p in ("pd", "t1", "t2")}
    params = {}
    for name in frac:
        tissue, jitter = TISSUES[name], rng.uniform(0.94, 1.06, 3).astype(np.float32)
        params[name] = (tissue.pd * jitter[0] * texture["pd"], tissue.t1 * jitter[1] * texture["t1"],
                        tissue.t2 * jitter[2] * texture["t2"])
    images = {}
    for seq, acq in ACQUISITIONS.items():
        total = np.zeros(vox.shape[1], np.float32)
        for name, (pd, t1, t2) in params.items():
            if acq.gadolinium and name == "enhancing":
                t1 = 1 / (1 / t1 + R1_GD * gd_mM)  # 1/T1 += r1 C
            total += frac[name] * signal(pd, t1, t2, acq)
        wm = TISSUES["wm"]
        gain = 1000 / signal(wm.pd, wm.t1, wm.t2, acq) * rng.uniform(0.8, 1.25)  # scanner gain
        total *= np.float32(gain) * _bias(rng, vox)
        sigma = rng.uniform(0.01, 0.04) * 1000  # noise, share of the WM signal
        noise = rng.standard_normal((2, total.size), dtype=np.float32) * np.float32(sigma)
        total = np.sqrt((total + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
        images[seq] = np.clip(np.rint(total), 0, np.iinfo(np.int16).max).astype(np.int16)
    return images


# ---------------------------------------------------------------- subjects and dataset

def subject_id(index: int) -> str:
    return f"BraTS2021_{index:05d}"


def make_subject(index: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One phantom subject on the BraTS grid, RAS+ voxel order (as `vq.nifti.load_volume` returns).

    Returns t1, t1ce, t2, flair (int16), seg (uint8, labels 0/1/2/4) and the
    tissue fractions wm, gm, csf, oedema, enhancing, necrosis (float32, after
    the tumour replaced tissue; they sum to 1 inside the brain), all (240, 240, 155).
    """
    rng = np.random.default_rng([seed, index])
    tpl = template()
    coords = _warp(rng, tpl)
    brain = ndi.map_coordinates(tpl.brain, coords, order=1) >= 0.5  # skull-stripped foreground
    points = coords[:, brain]
    del coords
    vox = np.stack(np.nonzero(brain)).astype(np.float32)  # (3, N) output voxel coordinates

    frac = {t: ndi.map_coordinates(getattr(tpl, t), points, order=1) for t in ("gm", "wm")}
    # CSF = brain - GM - WM; renormalised so the brain voxels are all tissue, as in skull-stripped data
    frac["csf"] = np.clip(ndi.map_coordinates(tpl.brain, points, order=1) - frac["gm"] - frac["wm"], 0, None)
    total = frac["gm"] + frac["wm"] + frac["csf"]
    frac = {t: f / total for t, f in frac.items()}

    seg = np.zeros(vox.shape[1], np.uint8)
    if index % NO_TUMOUR_EVERY != NO_TUMOUR_EVERY - 1:
        _add_tumour(rng, vox, frac, seg)
    images = _acquire(rng, vox, frac, gd_mM=rng.uniform(0.25, 0.5))

    out = {}
    for name, values in {**images, SEG: seg, **frac}.items():
        out[name] = np.zeros(SHAPE, values.dtype)
        out[name][brain] = values
    for name in TISSUES:
        out.setdefault(name, np.zeros(SHAPE, np.float32))
    return out


def coarsen(subject: dict[str, np.ndarray], factor: int) -> dict[str, np.ndarray]:
    """A subject on a grid `factor` times coarser, as a scanner with larger voxels would see it: images and
    tissue fractions averaged over each factor^3 block (partial volume), the segmentation by majority.
    Axes are padded with background to a multiple of `factor` (155 slices -> 78 at 2 mm)."""
    out = {}
    for name, array in subject.items():
        padded = np.pad(array, [(0, -n % factor) for n in array.shape])
        x, y, z = (n // factor for n in padded.shape)
        blocks = padded.reshape(x, factor, y, factor, z, factor).transpose(0, 2, 4, 1, 3, 5).reshape(x, y, z, -1)
        if name == SEG:
            values = np.array([0, *LABELS.values()], np.uint8)
            counts = np.stack([(blocks == v).sum(-1) for v in values])
            out[name] = values[counts.argmax(0)]
        elif np.issubdtype(array.dtype, np.integer):
            out[name] = np.rint(blocks.mean(-1, dtype=np.float32)).astype(array.dtype)
        else:
            out[name] = blocks.mean(-1, dtype=np.float32)
    return out


def grid_affine(spacing: int) -> np.ndarray:
    """The BraTS affine for voxels of `spacing` mm: voxel i's centre is the centre of 1 mm voxels
    spacing*i .. spacing*i + spacing - 1."""
    scale = np.diag([spacing, spacing, spacing, 1.0])
    scale[:3, 3] = (spacing - 1) / 2
    return AFFINE @ scale


def _save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> None:
    stored = np.ascontiguousarray(array[::-1, ::-1, :])  # RAS voxel order -> BraTS's LPS storage
    image = nib.Nifti1Image(stored, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def tissue_map(subject: dict[str, np.ndarray]) -> np.ndarray:
    """(X, Y, Z) uint8 label of each voxel's majority tissue (`vq.labels.TISSUE_LABELS`); 0 where no
    tissue reaches half the voxel (background and mixed partial-volume voxels)."""
    fractions = np.stack([subject[t] for t in TISSUE_LABELS])  # (6, X, Y, Z)
    labels = np.array(list(TISSUE_LABELS.values()), np.uint8)[fractions.argmax(0)]
    return np.where(fractions.max(0) >= 0.5, labels, 0).astype(np.uint8)


def write_subject(index: int, seed: int, out_dir: Path, spacing: int = 1) -> str:
    """Generate one subject (on a `spacing` mm grid) and write its five BraTS files and, beside them,
    its tissue map; returns the subject ID."""
    subject = make_subject(index, seed)
    if spacing > 1:
        subject = coarsen(subject, spacing)
    name = subject_id(index)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    affine = grid_affine(spacing)
    for kind in (*SEQUENCES, SEG):
        _save(subject[kind], folder / subject_file(name, kind), affine)
    _save(tissue_map(subject), folder / subject_file(name, TISSUE), affine)
    return name


def _manifest(n: int, seed: int, spacing: int = 1) -> dict:
    manifest = {"generator": "vq.tools.make_phantom_brats", "version": VERSION, "n": n, "seed": seed,
                "subjects": [subject_id(i) for i in range(n)]}
    return manifest if spacing == 1 else {**manifest, "spacing_mm": spacing}  # 1 mm manifests as before


def is_complete(out_dir: str | Path, n: int, seed: int, spacing: int = 1) -> bool:
    """True when out_dir holds a finished dataset of this generator version, n, seed and spacing."""
    out_dir = Path(out_dir)
    expected = _manifest(n, seed, spacing)
    try:
        if json.loads((out_dir / MANIFEST).read_text()) != expected:
            return False
    except (OSError, ValueError):
        return False
    files = [out_dir / f"{s}.csv" for s in SPLITS] + [
        out_dir / name / subject_file(name, kind) for name in expected["subjects"]
        for kind in (*SEQUENCES, SEG, TISSUE)]
    return all(f.is_file() for f in files)


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, workers: int | None = None,
                     force: bool = False, spacing: int = 1) -> Path:
    """Write n phantom subjects (voxels of `spacing` mm: 1, BraTS's grid, or coarser) and
    train/valid/test lists to out_dir; reuse a complete one."""
    out_dir = Path(out_dir)
    if n < 1:
        raise ValueError(f"number of subjects must be >= 1, got {n}")
    if spacing < 1:
        raise ValueError(f"spacing must be a whole number of mm >= 1, got {spacing}")
    if not force and is_complete(out_dir, n, seed, spacing):
        log.info("%s already holds the phantom dataset (n=%d, seed=%d); skipping (--force regenerates)",
                 out_dir, n, seed)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # written last: its presence means complete
    workers = min(workers or min(2, os.cpu_count() or 1), n)
    log.info("writing %d phantom subjects (seed %d) to %s with %d worker(s)", n, seed, out_dir, workers)
    job = functools.partial(write_subject, seed=seed, out_dir=out_dir, spacing=spacing)
    if workers == 1:
        names = [job(i) for i in tqdm(range(n), desc="phantom", unit="subject")]
    else:
        template()  # load once; forked workers inherit it
        methods = mp.get_all_start_methods()
        with mp.get_context("fork" if "fork" in methods else None).Pool(workers) as pool:
            names = list(tqdm(pool.imap_unordered(job, range(n)), total=n, desc="phantom", unit="subject"))
    make_lists(names, out_dir, seed)
    (out_dir / MANIFEST).write_text(json.dumps(_manifest(n, seed, spacing), indent=1))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (BraTS layout)")
    parser.add_argument("-n", type=int, default=24, help="number of subjects (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 2 or fewer cores)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete dataset exists")
    parser.add_argument("--spacing", type=int, default=1, help="voxel size in mm (default 1, the BraTS grid; "
                        "2: 120 x 120 x 78, block averages of the 1 mm phantom)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.n < 1:
        parser.error(f"-n must be >= 1, got {args.n}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.spacing < 1:
        parser.error(f"--spacing must be >= 1, got {args.spacing}")
    generate_dataset(args.out, args.n, args.seed, args.workers, args.force, args.spacing)


if __name__ == "__main__":
    main()
