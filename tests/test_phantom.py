"""The phantom looks like brain MRI: radiological facts, determinism and BraTS layout."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from vq.dataloader.lists import SPLITS, read_list, split_sizes
from vq.nifti import load_volume
from vq.sequences import SEG, SEQUENCES
from vq.tools.make_phantom_brats import MANIFEST, SHAPE, TISSUES, generate_dataset, make_subject, subject_id

NECROSIS, OEDEMA, ENHANCING = 1, 2, 4


@pytest.fixture(scope="module")
def subject():
    return make_subject(0, seed=0)  # index 0 has a tumour (only index % 8 == 7 has none)


def tissue_mean(subject, seq, tissue):
    """Mean signal over voxels (almost) purely of one tissue, outside the tumour."""
    pure = (subject[tissue] > 0.9) & (subject[SEG] == 0)
    assert pure.sum() > 1000, f"too few pure {tissue} voxels"
    return subject[seq][pure].mean()


def label_ratio(subject, seq, label):
    """Mean signal of a tumour label relative to white matter of the same image."""
    return subject[seq][subject[SEG] == label].mean() / tissue_mean(subject, seq, "wm")


def test_t1_white_matter_brightest_csf_darkest(subject):
    wm, gm, csf = (tissue_mean(subject, "t1", t) for t in ("wm", "gm", "csf"))
    assert wm > 1.1 * gm and gm > 1.3 * csf


def test_t2_order_reversed(subject):
    wm, gm, csf = (tissue_mean(subject, "t2", t) for t in ("wm", "gm", "csf"))
    assert csf > 1.3 * gm and gm > 1.2 * wm


def test_flair_suppresses_csf(subject):
    csf = tissue_mean(subject, "flair", "csf")
    assert csf < 0.5 * tissue_mean(subject, "flair", "gm")
    assert csf < 0.5 * tissue_mean(subject, "flair", "wm")


def test_gadolinium_enhances_the_rim(subject):
    assert label_ratio(subject, "t1ce", ENHANCING) > 1.4 * label_ratio(subject, "t1", ENHANCING)
    assert label_ratio(subject, "t1ce", ENHANCING) > 1.3  # brighter than white matter


def test_oedema_bright_in_t2_and_flair(subject):
    assert label_ratio(subject, "t2", OEDEMA) > 1.5
    assert label_ratio(subject, "flair", OEDEMA) > 1.2


def test_tumour_visible_in_t1(subject):
    # without this, T1 -> T1Gd could not know where the tumour is
    for label in (ENHANCING, NECROSIS):
        assert abs(label_ratio(subject, "t1", label) - 1) > 0.15


def test_labels_and_skull_stripping(subject):
    seg = subject[SEG]
    assert seg.dtype == np.uint8 and seg.shape == SHAPE
    assert set(np.unique(seg)) == {0, NECROSIS, OEDEMA, ENHANCING}
    outside = sum(subject[t] for t in TISSUES) < 0.5  # no tissue fractions: background
    assert 1e6 < (~outside).sum() < 3e6  # a brain of 1-3 litres
    assert not seg[outside].any()
    for seq in SEQUENCES:
        assert subject[seq].shape == SHAPE and subject[seq].dtype == np.int16
        assert not subject[seq][outside].any()  # skull-stripped, like BraTS


def test_files_in_brats_layout(phantom_dir):
    names = [subject_id(i) for i in range(6)]
    for name in names:
        for suffix in (*SEQUENCES, SEG):
            path = phantom_dir / name / f"{name}_{suffix}.nii.gz"
            image = nib.load(str(path))
            assert image.shape == SHAPE and np.allclose(image.header.get_zooms(), 1)
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # as BraTS2021 stores it
        assert load_volume(phantom_dir / name / f"{name}_t1.nii.gz").data.shape == SHAPE
    rows = {split: read_list(phantom_dir / f"{split}.csv") for split in SPLITS}
    assert tuple(len(r) for r in rows.values()) == split_sizes(6)
    assert sorted(name for r in rows.values() for name, _ in r) == names


def test_files_match_make_subject_exactly(phantom_dir, subject):
    # written by a worker process, read back in RAS order: same seed -> same bytes, same orientation
    name = subject_id(0)
    for suffix in (*SEQUENCES, SEG):
        data = load_volume(phantom_dir / name / f"{name}_{suffix}.nii.gz").data
        np.testing.assert_array_equal(data, subject[suffix])
    other = load_volume(phantom_dir / subject_id(1) / f"{subject_id(1)}_t1.nii.gz").data
    assert ((other > 0) != (subject["t1"] > 0)).sum() > 10_000  # another subject, another anatomy


def test_complete_dataset_is_reused(phantom_dir):
    manifest = phantom_dir / MANIFEST
    stamp = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["n"] == 6
    generate_dataset(phantom_dir, n=6, seed=0)
    assert manifest.stat().st_mtime_ns == stamp


def test_tissue_map_beside_the_brats_files_matches_the_contrasts(phantom_dir):
    """<ID>_tissue.nii.gz holds each brain voxel's majority tissue; read through vq.labels it gives the
    radiological order of the real images: T1 WM > GM > CSF, T2 the reverse, FLAIR CSF darkest."""
    from vq.labels import TISSUE, TISSUE_LABELS, load_labels

    name = subject_id(0)
    labels = load_labels(phantom_dir / name / f"{name}_{TISSUE}.nii.gz", allowed=(0, *TISSUE_LABELS.values()))
    t1, t2, flair = (load_volume(phantom_dir / name / f"{name}_{seq}.nii.gz").data for seq in ("t1", "t2", "flair"))
    assert ((labels > 0) == (t1 > 0)).mean() > 0.98  # tissue where the brain is
    mean = lambda image, tissue: image[labels == TISSUE_LABELS[tissue]].mean()
    assert mean(t1, "wm") > mean(t1, "gm") > mean(t1, "csf")
    assert mean(t2, "csf") > mean(t2, "gm") > mean(t2, "wm")
    assert mean(flair, "csf") < mean(flair, "wm")
    assert (labels == TISSUE_LABELS["enhancing"]).sum() > 100  # subject 0 has a tumour


def test_a_2mm_phantom_is_the_same_anatomy_on_a_coarser_grid(phantom_dir, tmp_path):
    """--spacing 2: half the voxels per axis, and in world coordinates the tumour and the brain sit where
    the 1 mm files have them (the affine carries the block centres), with the same tissue contrast."""
    coarse = generate_dataset(tmp_path / "p2", n=1, seed=0, workers=1, spacing=2)
    assert json.loads((coarse / MANIFEST).read_text())["spacing_mm"] == 2
    name = subject_id(0)

    def world_centre(folder, suffix, select):
        volume = load_volume(folder / name / f"{name}_{suffix}.nii.gz")
        index = np.argwhere(select(volume.data)).mean(0)
        return volume.affine[:3, :3] @ index + volume.affine[:3, 3], volume

    for suffix, select in ((SEG, lambda a: a > 0), ("t1", lambda a: a > 0)):
        fine, _ = world_centre(phantom_dir, suffix, select)
        centre, volume = world_centre(coarse, suffix, select)
        assert volume.data.shape == (120, 120, 78) and np.allclose(np.abs(np.diag(volume.affine)[:3]), 2)
        assert np.abs(centre - fine).max() < 1.0, (suffix, centre, fine)
    t2 = load_volume(coarse / name / f"{name}_t2.nii.gz").data
    seg = load_volume(coarse / name / f"{name}_{SEG}.nii.gz").data
    assert set(np.unique(seg)) <= {0, NECROSIS, OEDEMA, ENHANCING} and (seg == OEDEMA).any()
    assert t2[seg == OEDEMA].mean() > 1.3 * t2[(seg == 0) & (t2 > 0)].mean()  # oedema stays bright on T2
