"""The paper's claims beyond Table 1: source corruptions, the robustness script, one-shot segmentation."""
from __future__ import annotations

import csv
import logging
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS
from vq.corruptions import CORRUPTIONS, GHOST_PERIOD, corrupt
from vq.dataloader.lists import read_list, write_list
from vq.nifti import load_volume
from vq.labels import label_stack, load_labels
from vq.metrics import dice, region_dice
from vq.oneshot import KNN, LABELS, cell_majority, positions, segment
from vq.robustness import COLUMNS
from vq.sequences import available, missing
from vq.test.test_brats_vq_2d_oneshot_seg import main as oneshot_main
from vq.test.test_brats_vq_2d_robustness import main as robustness_main

CONFIG = CONFIGS / "demo_phantom_cpu.yaml"
KINDS = list(CORRUPTIONS)


def read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def stack() -> torch.Tensor:
    """(4, 1, 64, 64) in [-1, 1]: a textured ellipse on a -1 background."""
    gen = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    inside = (rows - 32) ** 2 / 22**2 + (cols - 30) ** 2 / 18**2 < 1
    image = -0.4 + 0.3 * torch.rand(4, 1, 64, 64, generator=gen)
    return torch.where(inside, image, torch.tensor(-1.0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- corruptions
@pytest.mark.parametrize("kind", KINDS)
def test_corruption_changes_the_brain_keeps_the_background_and_is_deterministic(stack, kind):
    out = corrupt(stack, kind, 2, gen(0))
    background = stack == -1
    assert out.shape == stack.shape and out.min() >= -1 and out.max() <= 1
    assert (out[background] == -1).all()
    assert (out[~background] - stack[~background]).abs().mean() > 1e-3
    assert torch.equal(out, corrupt(stack, kind, 2, gen(0)))
    assert not torch.equal(out, corrupt(stack, kind, 2, gen(1)))
    assert corrupt(stack, kind, 0, gen(0)) is stack  # level 0 is the clean image


@pytest.mark.parametrize("kind", KINDS)
def test_corruption_grows_with_level(stack, kind):
    mse = [float((corrupt(stack, kind, level, gen(0)) - stack).pow(2).mean()) for level in range(4)]
    assert mse[0] == 0 and mse[1] < mse[2] < mse[3], mse


def test_ghosting_puts_signal_where_the_object_is_not():
    """A bright band in rows 4..12 of a dark (but foreground) image: ghosts appear H/4 rows away."""
    image = torch.full((1, 1, 64, 64), -0.9)
    image[..., 4:12, 16:48] = 0.8
    ghosted = corrupt(image, "ghosting", 3, gen(0))
    shift = 64 // GHOST_PERIOD
    change = (ghosted - image).abs()[0, 0]  # (H, W)
    assert change[4 + shift:12 + shift, 16:48].mean() > 0.2  # the ghost of the band
    assert change[4 + shift:12 + shift, 16:48].mean() > 10 * change[4 + shift:12 + shift, :8].mean()


def test_level_and_kind_are_checked(stack):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(stack, "blur", 1, gen())
    with pytest.raises(ValueError, match="level 4"):
        corrupt(stack, "noise", 4, gen())


# ----------------------------------------------------------------------------- robustness script
@pytest.fixture(scope="module")
def robustness(trained_run, alexnet_weights_file, tmp_path_factory):
    """The script with --compare on the same checkpoint, 1 subject, 8 slices (SSIM 3D needs 7), LPIPS on."""
    overrides, run_dir = trained_run
    out = tmp_path_factory.mktemp("robustness")
    ckpt = str(run_dir / "ckpt_best.pth")
    argv = ["-d", "cpu", "-c", str(CONFIG), "-l", ckpt, "-o", str(out), "--compare", ckpt,
            "--subjects", "1", "--slices", "8", "--lpips-weights", str(alexnet_weights_file), "--set", *overrides]
    return robustness_main(argv), out, overrides, argv


def test_robustness_writes_a_row_per_model_condition_and_translation(robustness, phantom_dir):
    code, out, _, _ = robustness
    assert code == 0
    header, rows = read_csv(out / "robustness.csv")
    assert header == COLUMNS
    name, subject_code = read_list(phantom_dir / "test.csv")[0]
    pairs = len(available(subject_code)) * len(missing(subject_code))
    models = sorted({row["model"] for row in rows})
    assert len(models) == 2  # the same checkpoint twice gets two labels
    conditions = {(row["corruption"], row["level"]) for row in rows}
    assert conditions == {("none", "0")} | {(k, str(lv)) for k in KINDS for lv in (1, 2, 3)}
    assert len(rows) == len(models) * len(conditions) * pairs
    assert {row["name"] for row in rows} == {name}
    by_model = {m: [(r["corruption"], r["level"], r["src"], r["tgt"], r["psnr"]) for r in rows if r["model"] == m]
                for m in models}
    assert by_model[models[0]] == by_model[models[1]]  # same weights, same corrupted inputs
    for row in rows:
        assert math.isfinite(float(row["psnr"])) and float(row["lpips"]) > 0
        assert (row["input_psnr"] == "inf") == (row["level"] == "0")
    table = (out / "robustness.md").read_text()
    assert all(kind in table for kind in KINDS) and all(m in table for m in models)
    assert (out / "robustness.png").stat().st_size > 1000


def test_robustness_refuses_to_overwrite(robustness):
    code, _, _, argv = robustness
    assert code == 0
    assert robustness_main(argv) == 2


# ----------------------------------------------------------------------------- one-shot segmentation
def test_dice_on_hand_made_masks():
    empty = torch.zeros(2, 4, 4, dtype=torch.bool)
    a, b = empty.clone(), empty.clone()
    a[0, :2, :2] = True  # 4 pixels
    b[0, :2, 1:3] = True  # 4 pixels, 2 shared
    assert dice(empty, empty) == 1.0
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(empty, a) == 0.0 and dice(a, ~a) == 0.0
    truth = torch.tensor([[0, 2, 1, 4]])
    pred = torch.tensor([[0, 2, 4, 0]])  # necrosis called enhancing, enhancing missed
    assert region_dice(pred, truth) == pytest.approx({"wt": 0.8, "tc": 2 / 3, "et": 0.0})


def test_load_labels_matches_load_volume_and_accepts_an_empty_segmentation(phantom_dir, tmp_path):
    name = read_list(phantom_dir / "test.csv")[0][0]
    seg = phantom_dir / name / f"{name}_seg.nii.gz"
    labels = load_labels(seg)
    assert labels.any() and np.array_equal(labels, load_volume(seg).data.astype(np.uint8))
    image = nib.load(str(seg))
    empty = tmp_path / "empty_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(empty))
    assert load_labels(empty).shape == labels.shape and not load_labels(empty).any()


def test_knn_segmentation_with_perfect_features_recovers_the_labels(phantom_dir):
    """Features that ARE the cell labels: only the 1/4-resolution bookkeeping (slices, crop, majority vote,
    bilinear upsampling, label codes) stands between the prediction and the truth."""
    name = read_list(phantom_dir / "test.csv")[0][0]
    labels = label_stack(load_labels(phantom_dir / name / f"{name}_seg.nii.gz"), 128, 16, 192)  # (16, 192, 192)
    cells = cell_majority(labels, 4)  # (16, 48, 48)
    features = F.one_hot(cells, len(LABELS)).permute(0, 3, 1, 2).float()  # (16, 4, 48, 48)
    pred = segment(KNN(positions(features), cells.flatten()), features, torch.zeros(16, 1, 192, 192))
    scores = region_dice(pred, labels)
    assert labels.any() and scores["wt"] > 0.85 and scores["tc"] > 0.75 and scores["et"] > 0.6, scores


def test_oneshot_segmentation_finds_the_supports_labels_in_its_copy(trained_run, phantom_dir, tmp_path):
    """A query that is a copy of the support (under another ID) must get the support's own labels back:
    this ties labels, images, crop, features and Dice together end to end. The intensity features are
    used (the 6-step model's latent is not trained enough to separate tumour); the latent runs beside."""
    overrides, run_dir = trained_run
    (support, code), (other, other_code) = read_list(phantom_dir / "test.csv")
    root, copy = tmp_path / "data", "BraTS2021_00099"
    (root / copy).mkdir(parents=True)
    for name in (support, other):
        (root / name).symlink_to(phantom_dir / name)
    for file in (phantom_dir / support).iterdir():
        (root / copy / file.name.replace(support, copy)).symlink_to(file)
    write_list(root / "test.csv", [(support, code), (other, other_code), (copy, code)])
    out = tmp_path / "oneshot"
    # the phantom's tumours lie off-centre: a 128 crop (the fully convolutional model takes any size) holds them
    assert oneshot_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"), "-o", str(out),
                         "--query-seq", "t1ce", "--set", *overrides, "data.crop=128", f"data.root={root}",
                         f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    header, rows = read_csv(out / "oneshot_seg.csv")
    assert header == ["name", "seq", "feature", "wt", "tc", "et"]
    assert sorted((row["name"], row["feature"]) for row in rows) == sorted(
        (name, feature) for name in (other, copy) for feature in ("intensity", "latent"))  # the default support left out
    scores = {(row["name"], row["feature"]): {r: float(row[r]) for r in ("wt", "tc", "et")} for row in rows}
    mine, theirs = scores[copy, "intensity"], scores[other, "intensity"]
    assert mine["tc"] > 0.8 and mine["et"] > 0.8, mine  # measured 0.88 and 0.88
    assert mine["tc"] > theirs["tc"] and mine["et"] > theirs["et"], (mine, theirs)
    tc = [scores[name, "intensity"]["tc"] for name in (other, copy)]
    table = (out / "oneshot_seg.md").read_text()
    assert "| intensity | 2 | " in table and f"{np.mean(tc):.3f} +- {np.std(tc):.3f}" in table


def test_oneshot_checks_every_segmentation_before_the_first_prediction(trained_run, phantom_dir, tmp_path, caplog):
    """A broken segmentation of the last query stops the run before the support is even encoded."""
    caplog.set_level(logging.INFO)
    overrides, run_dir = trained_run
    subjects = read_list(phantom_dir / "test.csv")
    root = tmp_path / "data"
    root.mkdir()
    for name, _ in subjects:
        (root / name).symlink_to(phantom_dir / name)
    last, _ = subjects[-1]
    (root / last).unlink()
    (root / last).mkdir()
    for file in (phantom_dir / last).iterdir():
        (root / last / file.name).symlink_to(file)
    seg = root / last / f"{last}_seg.nii.gz"
    seg.unlink()
    seg.write_bytes((phantom_dir / last / seg.name).read_bytes()[:2000])  # truncated
    write_list(root / "test.csv", subjects)
    out = tmp_path / "oneshot"
    assert oneshot_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"), "-o", str(out),
                         "--set", *overrides, "data.crop=128", f"data.root={root}",
                         f"data.cache_dir={tmp_path / 'cache'}"]) == 2  # 128: the first subject's tumour is in
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and seg.name in errors[-1]
    assert not any(r.getMessage().startswith("support ") for r in caplog.records)  # no classifier was built
    assert not out.exists()
