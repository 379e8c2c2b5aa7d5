"""Sources on different grids: resampling through the affines, registration, and synthesis across grids."""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from conftest import CONFIGS
from vq.checkpoint import save_checkpoint
from vq.config import load_config
from vq.grid import Grid, align, coverage, grid_of, on_working_grid, register_rigid, resample, working_grid
from vq.models import build_model
from vq.nifti import load_volume
from vq.tools.synthesize import main as synthesize_main

TINY = ["model.base_channels=4", "model.n_res=1", "model.n_kernels=2", "model.n_embed=16", "test.batch_size=8"]


def head(shape=(40, 48, 32), seed=0) -> np.ndarray:
    """A smooth, asymmetric 'head': an ellipsoid of 1 with three blobs of other intensity, background 0."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)  # (X, Y, Z, 3)
    image = (np.sum((grid / [0.65, 0.7, 0.6]) ** 2, -1) < 1).astype(np.float32)
    rng = np.random.default_rng(seed)
    for centre, value in zip(rng.uniform(-0.4, 0.4, (3, 3)), (0.5, 2.0, 1.5)):
        image += value * np.exp(-np.sum((grid - centre) ** 2, -1) / 0.04) * (image > 0)
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, 1.0).astype(np.float32) * 100


def rigid(degrees, shift_mm) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    matrix[:3, 3] = shift_mm
    return matrix


def grid_with(shape, spacing, degrees=(0, 0, 0), origin=(-20.0, -30.0, -15.0)) -> Grid:
    affine = rigid(degrees, origin) @ np.diag([*spacing, 1.0])
    return Grid(affine, tuple(shape))


def save(data: np.ndarray, grid: Grid, path) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), grid.affine), str(path))
    return str(path)


# ----------------------------------------------------------------------------- resampling
def test_working_grid_keeps_a_1mm_grid_and_its_centre():
    t1 = grid_with((48, 56, 40), (1, 1, 1), (5, 0, 10))
    assert working_grid(t1).shape == t1.shape and np.allclose(working_grid(t1).affine, t1.affine)
    flair = grid_with((53, 62, 8), (0.9, 0.9, 5), (0, 20, 0))
    work = working_grid(flair)
    assert work.shape == (48, 56, 40) and np.allclose(work.spacing, 1)
    centre = lambda g: g.affine[:3, :3] @ ((np.asarray(g.shape) - 1) / 2) + g.affine[:3, 3]
    assert np.allclose(centre(work), centre(flair))


def test_resampling_matches_simpleitk_on_an_oblique_file(tmp_path):
    """nibabel's reorientation, our affines and SimpleITK's reading of the same file agree."""
    data = head()
    stored = grid_with(data.shape, (1.0, 1.2, 1.5), (10, -5, 30))
    # stored in another voxel order (axes permuted and flipped); the affine follows
    image = nib.Nifti1Image(data, stored.affine).as_reoriented(np.array([[1, -1], [2, 1], [0, -1]]))
    nib.save(image, str(tmp_path / "oblique.nii.gz"))
    volume = load_volume(tmp_path / "oblique.nii.gz")
    target = grid_with((40, 44, 30), (1.1, 1.1, 1.6), (0, 15, 0), origin=(-15.0, -25.0, -12.0))
    ours = resample(volume.data, grid_of(volume), target)  # (X, Y, Z)

    from vq.grid import to_sitk

    reference = to_sitk(np.zeros(target.shape, np.float32), target)
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(tmp_path / "oblique.nii.gz"), sitk.sitkFloat32),
                                                  reference, sitk.Transform(), sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    inside = theirs > 1
    assert inside.sum() > 2000
    assert np.abs(ours - theirs)[inside].max() < 0.02 * data.max()


@pytest.mark.parametrize("spacing, depth, tolerance", [((0.9, 0.9, 1.0), 45, 0.005), ((0.9, 0.9, 2.5), 18, 0.02)])
def test_rotated_anisotropic_round_trip_recovers_the_volume(spacing, depth, tolerance):
    data = head()
    one_mm = grid_with(data.shape, (1, 1, 1))
    turned = grid_with((60, 70, depth), spacing, (0, 0, 25), origin=(-25.0, -35.0, -18.0))
    back = resample(resample(data, one_mm, turned), turned, one_mm)
    inside = coverage(turned, one_mm)
    inside[:8], inside[-8:], inside[:, :8], inside[:, -8:], inside[..., :8], inside[..., -8:] = (False,) * 6
    assert inside.mean() > 0.15
    error = np.abs(back - data)[inside].mean()
    assert error < tolerance * data.max() and np.corrcoef(back[inside], data[inside])[0, 1] > 0.99
    shifted = np.roll(data, 2, axis=2)  # a wrong slice axis or sign would look like this, or worse
    assert np.abs(shifted - data)[inside].mean() > 2 * error


# ----------------------------------------------------------------------------- registration
def test_registration_recovers_a_known_rigid_motion():
    data = head()
    grid = grid_with(data.shape, (1, 1, 1))
    motion = rigid((4, -6, 8), (5.0, -4.0, 3.0))  # fixed RAS point -> moving RAS point
    moved = resample(data, grid, grid, np.linalg.inv(motion))  # the head moved by `motion` in the scanner
    world, transform = register_rigid(data, grid, moved, grid)
    voxels = np.argwhere(data > 50)[::50]  # (N, 3) inside the head
    points = grid.affine @ np.c_[voxels, np.ones(len(voxels))].T  # (4, N) RAS mm
    error = np.linalg.norm((world @ points - motion @ points)[:3], axis=0)
    assert error.max() < 1.0, error.max()
    # ITK's own transform maps the same points (in LPS) to the same place
    lps = np.diag([-1, -1, 1, 1]) @ points
    mapped = np.array([transform.TransformPoint(p[:3].tolist()) for p in lps.T]).T
    assert np.allclose(np.diag([-1, -1, 1]) @ mapped, (world @ points)[:3], atol=1e-6)


def test_registration_is_the_same_on_every_call():
    """A seed fixes the metric's random samples, seed 0 included (SimpleITK takes 0 for the wall clock,
    which moved this motion's result by up to 1 mm from call to call)."""
    data = head()
    grid = grid_with(data.shape, (1, 1, 1))
    moved = resample(data, grid, grid, np.linalg.inv(rigid((4, -6, 8), (5.0, -4.0, 3.0))))
    first, again = (register_rigid(data, grid, moved, grid)[0] for _ in range(2))
    assert np.allclose(first, again, atol=1e-9)
    other = register_rigid(data, grid, moved, grid, seed=1)[0]
    assert not np.array_equal(first, other)  # the seed does reach the sampling


# ----------------------------------------------------------------------------- synthesis across grids
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny model's checkpoint: synthesis is then a fixed function of its inputs."""
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", TINY)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pth"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, path)
    return path


def synthesize(model, out, *args) -> int:
    return synthesize_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "-l", str(model),
                            "-o", str(out), *args, "--set", *TINY])


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """t1 on a 1 mm grid; flair on the same grid, on a larger grid in another voxel order (exact: whole-voxel
    offsets), on a rotated 0.9 x 0.9 x 2.5 mm grid, and moved (rotated and shifted in the scanner)."""
    folder = tmp_path_factory.mktemp("scans")
    t1 = head(seed=0)
    flair = np.where(t1 > 1, 250 - t1 + 0.3 * head(seed=1), 0)  # another contrast of the same head
    one_mm = grid_with(t1.shape, (1, 1, 1))
    bigger = Grid(one_mm.affine @ rigid((0, 0, 0), (-4, -3, -2)), (56, 62, 46))
    flipped = nib.Nifti1Image(resample(flair, one_mm, bigger), bigger.affine).as_reoriented([[2, -1], [0, 1], [1, -1]])
    thick = grid_with((60, 70, 18), (0.9, 0.9, 2.5), (0, 0, 25), origin=(-25.0, -35.0, -18.0))
    files = {"t1": save(t1, one_mm, folder / "t1.nii.gz"), "flair": save(flair, one_mm, folder / "flair.nii.gz"),
             "flair_thick": save(resample(flair, one_mm, thick), thick, folder / "flair_thick.nii.gz"),
             "flair_moved": save(resample(flair, one_mm, one_mm, np.linalg.inv(rigid((4, -5, 8), (5.0, -4.0, 3.0)))),
                                 one_mm, folder / "flair_moved.nii.gz"),
             "flair_far": save(flair, Grid(one_mm.affine @ rigid((0, 0, 0), (0, 0, 500)), one_mm.shape),
                               folder / "flair_far.nii.gz")}
    files["flair_flipped"] = str(folder / "flair_flipped.nii.gz")
    nib.save(flipped, files["flair_flipped"])
    mask = np.zeros(t1.shape, np.uint8)
    mask[10:-10, 10:-10, 8:-8] = 1
    files["mask"] = save(mask, one_mm, folder / "mask.nii.gz")
    files["one_mm"], files["thick"] = one_mm, thick
    return files


def fused(out, tgt="t2") -> np.ndarray:
    return np.asarray(nib.load(str(out / f"{tgt}_fused.nii.gz")).dataobj)


def test_sources_in_another_voxel_order_and_field_of_view_give_the_same_synthesis(tiny_model, scans, tmp_path):
    assert synthesize(tiny_model, tmp_path / "same", "--src", "t1", scans["t1"], "--src", "flair", scans["flair"],
                      "--tgt", "t2") == 0
    assert synthesize(tiny_model, tmp_path / "other", "--src", "t1", scans["t1"], "--src", "flair",
                      scans["flair_flipped"], "--tgt", "t2") == 0
    same, other = fused(tmp_path / "same"), fused(tmp_path / "other")
    assert same.shape == scans["one_mm"].shape and same.std() > 0
    assert np.allclose(same, other, atol=1e-4)


def test_a_thick_oblique_source_is_used_and_outputs_land_on_the_chosen_grid(tiny_model, scans, tmp_path):
    args = ["--src", "t1", scans["t1"], "--src", "flair", scans["flair_thick"], "--tgt", "t2"]
    assert synthesize(tiny_model, tmp_path / "first", *args) == 0
    out = nib.load(str(tmp_path / "first" / "t2_fused.nii.gz"))
    assert out.shape == scans["one_mm"].shape and np.allclose(out.affine, scans["one_mm"].affine)
    assert not np.allclose(out.get_fdata(), nib.load(str(tmp_path / "first" / "t2_from_t1.nii.gz")).get_fdata())

    assert synthesize(tiny_model, tmp_path / "each", *args, "--grid", "each") == 0
    on_flair = nib.load(str(tmp_path / "each" / "t2_fused_on_flair.nii.gz"))
    assert on_flair.shape == scans["thick"].shape and np.allclose(on_flair.affine, scans["thick"].affine)
    assert np.allclose(nib.load(str(tmp_path / "each" / "t2_fused_on_t1.nii.gz")).get_fdata(), out.get_fdata())

    assert synthesize(tiny_model, tmp_path / "work", "--src", "flair", scans["flair_thick"], "--tgt", "t2",
                      "--grid", "work") == 0
    work = nib.load(str(tmp_path / "work" / "t2_from_flair.nii.gz"))
    assert np.allclose(np.linalg.norm(work.affine[:3, :3], axis=0), 1) and work.shape == (54, 63, 45)


def test_register_writes_the_transform_and_undoes_the_motion(tiny_model, scans, tmp_path):
    assert synthesize(tiny_model, tmp_path, "--src", "t1", scans["t1"], "--src", "flair", scans["flair_moved"],
                      "--tgt", "t2", "--register") == 0
    assert sitk.ReadTransform(str(tmp_path / "flair_to_t1.tfm")).GetDimension() == 3
    brain = nib.load(scans["t1"]).get_fdata() > 50
    truth = nib.load(scans["flair"]).get_fdata()[brain]
    error = {}
    for register in (False, True):
        sources = {0: load_volume(scans["t1"]), 3: load_volume(scans["flair_moved"])}
        _, data, _, _ = on_working_grid(sources, align(sources, register, seed=0)[0])
        error[register] = np.abs(data[3][brain] - truth).mean()  # the flair the model sees vs the unmoved one
    assert error[True] < 0.1 * error[False], error


def test_mask_zeroes_the_background_and_scale_source_gives_source_units(tiny_model, scans, tmp_path):
    args = ["--src", "t1", scans["t1"], "--tgt", "t2", "--mask", scans["mask"]]
    assert synthesize(tiny_model, tmp_path / "unit", *args) == 0
    assert synthesize(tiny_model, tmp_path / "source", *args, "--scale", "source") == 0
    unit = nib.load(str(tmp_path / "unit" / "t2_from_t1.nii.gz")).get_fdata()
    source = nib.load(str(tmp_path / "source" / "t2_from_t1.nii.gz")).get_fdata()
    mask = nib.load(scans["mask"]).get_fdata() > 0
    assert unit[~mask].max() == 0 and unit[mask].std() > 0
    t1 = nib.load(scans["t1"]).get_fdata() * mask
    clip = 2 * np.percentile(t1, 99)
    assert np.allclose(source, unit * clip, rtol=1e-4, atol=1e-3)


def test_an_unstripped_scan_gets_one_warning_that_says_what_to_do(tiny_model, scans, tmp_path, caplog):
    noisy = nib.load(scans["t1"])
    path = save(noisy.get_fdata() + 5.0, scans["one_mm"], tmp_path / "head_with_background.nii.gz")
    with caplog.at_level(logging.WARNING):
        assert synthesize(tiny_model, tmp_path / "out", "--src", "t1", path, "--tgt", "t2") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "head_with_background.nii.gz" in warnings[0] and "--mask" in warnings[0]


@pytest.mark.parametrize("case, message", [
    ("far", "flair_far.nii.gz: no overlap with"),
    ("4d", "series.nii.gz: expected a 3D volume, got a 4D image"),
    ("2d", "slice.nii.gz: expected a 3D volume, got a 2D image"),
])
def test_unusable_sources_end_in_one_line_naming_the_file(tiny_model, scans, tmp_path, caplog, case, message):
    if case == "far":
        path = scans["flair_far"]
    elif case == "4d":
        path = str(tmp_path / "series.nii.gz")
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), path)
    else:
        path = str(tmp_path / "slice.nii.gz")
        nib.save(nib.Nifti1Image(np.ones((8, 8, 1), np.float32), np.eye(4)), path)
    with caplog.at_level(logging.ERROR):
        assert synthesize(tiny_model, tmp_path, "--src", "t1", scans["t1"], "--src", "flair", path, "--tgt", "t2") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]


@pytest.mark.parametrize("flag", ["--src", "--tgt"])
def test_an_unknown_sequence_name_is_a_one_line_usage_error(tiny_model, scans, tmp_path, capsys, flag):
    args = ["--src", "t1", scans["t1"], "--tgt", "t2"] + (["--src", "pd", scans["flair"]] if flag == "--src"
                                                          else ["t3"])
    with pytest.raises(SystemExit) as exit_:
        synthesize(tiny_model, tmp_path, *args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "unknown sequence" in err and flag in err


def test_the_measured_thick_flair_grid_is_oblique_anisotropic_and_covers_the_head():
    from vq.tools.synthesis_across_grids import thick_grid

    brats = Grid(np.diag([-1.0, -1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 0], [0, 0, 0, 239], [0, 0, 0, 0], [0, 0, 0, 0]]),
                 (240, 240, 155))
    thick = thick_grid(brats)
    assert np.allclose(thick.spacing, [0.9, 0.9, 5.0])
    assert nib.aff2axcodes(thick.affine) != nib.aff2axcodes(brats.affine)
    assert coverage(thick, brats)[20:-20, 20:-20, 10:-10].all()


# ----------------------------------------------------------------------------- z-scored and negative inputs
def test_a_zscored_volume_is_mapped_back_onto_the_raw_normalisation(phantom_dir):
    """Inside the brain z-scoring is affine, so matching the brain's robust range to the model's
    reference (here: this very volume's, as training would record it) gives back the raw normalisation."""
    from vq.dataloader.preprocess import brain_range, normalize, prepare

    raw = load_volume(phantom_dir / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz").data
    brain = raw > 0
    zscored = np.where(brain, (raw - raw[brain].mean()) / raw[brain].std(), 0)
    expected = normalize(raw)
    mapped = prepare(zscored, reference=brain_range(expected))
    assert (mapped[~brain] == -1).all()
    inside = brain & (expected < 1)  # not where the raw normalisation clips at 2 x p99
    assert np.abs(mapped[inside] - expected[inside]).max() < 0.01
    np.testing.assert_array_equal(prepare(raw), expected)  # scanner intensities: unchanged


@pytest.mark.parametrize("case, message", [
    ("constant", "the brain's intensities are constant"),
    ("no_background", "no voxel is background"),
])
def test_intensities_that_cannot_be_mapped_are_named(tiny_model, scans, tmp_path, caplog, case, message):
    source = load_volume(scans["t1"])
    data = np.where(source.data > 0, -2.0, 0.0) if case == "constant" else source.data - source.data.max() - 1
    path = save(data.astype(np.float32), scans["one_mm"], tmp_path / f"{case}.nii.gz")
    with caplog.at_level(logging.ERROR):
        assert synthesize(tiny_model, tmp_path / "out", "--src", "t1", path, "--tgt", "t2") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and f"{case}.nii.gz" in errors[0]
    assert "overlap" not in errors[0]


def test_zscored_and_negated_sources_are_synthesised_with_one_log_line(tiny_model, scans, tmp_path, caplog):
    source = load_volume(scans["t1"]).data
    brain = source > 0
    files = {"zscored": np.where(brain, (source - source[brain].mean()) / source[brain].std(), 0),
             "negated": -source}
    for name, data in files.items():
        path = save(data.astype(np.float32), scans["one_mm"], tmp_path / f"{name}.nii.gz")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert synthesize(tiny_model, tmp_path / name, "--src", "t1", path, "--tgt", "t2") == 0
        said = [r.getMessage() for r in caplog.records if "negative intensities inside the brain" in r.getMessage()]
        assert len(said) == 1 and f"{name}.nii.gz" in said[0]
        assert (tmp_path / name / "t2_from_t1.nii.gz").is_file()
