"""Data path: normalisation, crops, the slice cache, training pairs, augmentation, data lists."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import vq.nifti
from vq.config import REPO_ROOT, Config, DataConfig
from vq.dataloader.augment import IntensityAugment
from vq.dataloader.brats import BratsDataError, SliceCache, load_subject, subject_files
from vq.dataloader.datasets import PairDataset, load_eval_stack, make_train_loader
from vq.dataloader.lists import DataListError, read_list, spread_codes
from vq.dataloader.preprocess import central_slices, normalize, pad_or_crop
from vq.sequences import CODES as PATTERNS
from vq.sequences import SEQUENCES, available
from vq.tools.make_data_list import main as make_data_list

SHAPE = (40, 48, 20)  # (X, Y, Z): non-square, so a swapped crop axis would show
CODES = {"S0": 3, "S1": 4, "S2": 5, "S3": 14}  # n mod 3 = 0, 1, 2, 2


def write_subject(root, name, seed, shape=SHAPE):
    """A blob "brain" with random texture; t1ce = 3 x t1, so both normalise to the same image."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    texture = rng.uniform(0.5, 1.5, shape) * brain
    volumes = {"t1": 100 * texture, "t1ce": 300 * texture, "t2": (2 - texture) * 100 * brain,
               "flair": 80 * texture**2, "seg": (texture > 1.4).astype(np.float32)}
    (root / name).mkdir(parents=True, exist_ok=True)
    for kind, data in volumes.items():
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(root / name / f"{name}_{kind}.nii.gz"))


@pytest.fixture
def brats(tmp_path):
    root = tmp_path / "brats"
    for i, name in enumerate(CODES):
        write_subject(root, name, seed=i)
    return root


@pytest.fixture
def cfg():
    return DataConfig(n_slices=8, crop=32)


@pytest.fixture
def load_counter(monkeypatch):
    """Counts NIfTI reads by file name."""
    calls = []
    real = vq.nifti.load_volume

    def counting(path, **kw):
        calls.append(os.path.basename(path))
        return real(path, **kw)

    monkeypatch.setattr(vq.nifti, "load_volume", counting)
    return calls


def make_cache(tmp_path, brats, cfg):
    return SliceCache(tmp_path / "cache", brats, cfg, workers=0)


# --- preprocessing ---

def test_normalize_background_to_minus_one_and_clip_point_to_one():
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = rng.uniform(10, 100, (10, 10, 10))
    volume[0, 0, :3] = 1e4, 1e4, -5  # two bright outliers, one negative voxel
    top = 2 * np.percentile(volume, 99)
    volume[0, 0, 0] = top  # still the largest but one: the percentile does not move
    assert 2 * np.percentile(volume, 99) == top
    out = normalize(volume)
    assert out.dtype == np.float32 and out.min() == -1 and out.max() == 1
    assert out[1, 1, 1] == -1 and out[0, 0, 2] == -1  # background and negatives
    assert out[0, 0, 0] == pytest.approx(1) and out[0, 0, 1] == 1  # clip point and above
    np.testing.assert_allclose(out, np.clip(volume, 0, top) / top * 2 - 1, atol=1e-6)  # linear in between


def test_normalize_tiny_foreground_uses_positive_voxels():
    volume = np.zeros((30, 30, 30), np.float32)
    volume[0, 0, :20] = np.arange(1, 21)  # < 1% foreground: the all-voxel percentile is 0
    out = normalize(volume)
    top = 2 * np.percentile(np.arange(1, 21), 99)
    np.testing.assert_allclose(out[0, 0, :20], np.arange(1, 21) / top * 2 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="no positive"):
        normalize(np.zeros((4, 4, 4)))


def test_central_slices_and_pad_or_crop():
    assert central_slices(155, 128) == slice(13, 141)
    with pytest.raises(ValueError, match="fewer"):
        central_slices(100, 128)
    image = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    fitted = pad_or_crop(image, 8)  # pads H (6 -> 8) with -1, crops W (10 -> 8) centred
    assert fitted.shape == (8, 8) and (fitted[0] == -1).all() and (fitted[-1] == -1).all()
    np.testing.assert_array_equal(fitted[1:7], image[:, 1:9])
    back = pad_or_crop(fitted, image.shape)  # centred fitting undoes itself where data was kept
    np.testing.assert_array_equal(back[:, 1:9], image[:, 1:9])
    np.testing.assert_array_equal(pad_or_crop(image, (4, 4), start=(2, 5)), image[2:6, 5:9])


# --- subjects and the slice cache ---

def test_subject_files_names_missing_file(brats):
    (brats / "S1" / "S1_t2.nii.gz").unlink()
    with pytest.raises(BratsDataError, match=r"subject S1: missing file .*S1_t2\.nii\.gz"):
        subject_files(brats, "S1")
    assert set(subject_files(brats, "S1", ["t1", "flair"])) == {"t1", "flair"}


def test_load_subject_checks_shapes(brats):
    stack = load_subject(brats, "S0", percentile=99, n_slices=8)
    assert stack.shape == (4, 40, 48, 8) and stack.min() == -1 and -1 < stack.max() <= 1
    np.testing.assert_allclose(stack[0], stack[1], atol=1e-5)  # t1ce = 3 x t1
    vol = nib.load(str(brats / "S0" / "S0_flair.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(vol.dataobj)[:, :44], np.eye(4)), str(brats / "S0" / "S0_flair.nii.gz"))
    with pytest.raises(BratsDataError, match=r"subject S0: volumes differ in shape: .*S0_flair\.nii\.gz \(40, 44, 20\)"):
        load_subject(brats, "S0", n_slices=8)


def test_a_sequence_of_another_depth_is_refused(tmp_path, brats, cfg):
    # 8 central slices of 20 and of 18 would be different anatomy, though their shapes agree
    vol = nib.load(str(brats / "S0" / "S0_flair.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(vol.dataobj)[:, :, :18], np.eye(4)), str(brats / "S0" / "S0_flair.nii.gz"))
    with pytest.raises(BratsDataError, match=r"volumes differ in shape: .*S0_flair\.nii\.gz \(40, 48, 18\)"):
        load_subject(brats, "S0", n_slices=8)
    with pytest.raises(BratsDataError, match=r"volumes differ in shape"):
        make_cache(tmp_path, brats, cfg).ensure(["S0"])


def test_cache_hit_does_not_reload(tmp_path, brats, cfg, load_counter):
    cache = make_cache(tmp_path, brats, cfg)
    assert cache.ensure(list(CODES)) == list(CODES)
    assert len(load_counter) == 4 * 4
    volume = cache.volume("S0", "t1")
    assert volume.dtype == np.float16 and volume.shape == (8, 40, 48)  # (n_slices, X, Y)
    expected = load_subject(brats, "S0", ["t1"], n_slices=8)[0].transpose(2, 0, 1)
    np.testing.assert_allclose(volume, expected, atol=1e-3)
    load_counter.clear()
    assert cache.ensure(list(CODES)) == list(CODES)
    assert load_counter == []


def test_cache_rebuilds_changed_source(tmp_path, brats, cfg, load_counter):
    cache = make_cache(tmp_path, brats, cfg)
    cache.ensure(list(CODES))
    before = np.array(cache.volume("S2", "t2"))
    write_subject(brats, "S2", seed=99)  # new content: size and mtime change
    source = brats / "S2" / "S2_t2.nii.gz"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    load_counter.clear()
    cache.ensure(list(CODES))
    assert sorted(load_counter) == sorted(f"S2_{s}.nii.gz" for s in SEQUENCES)
    assert not np.array_equal(before, cache.volume("S2", "t2"))
    load_counter.clear()
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # touch only
    cache.ensure(["S2"])
    assert load_counter == ["S2_t2.nii.gz"]


def test_cache_rebuilds_truncated_npy_and_missing_manifest(tmp_path, brats, cfg, load_counter):
    cache = make_cache(tmp_path, brats, cfg)
    cache.ensure(list(CODES))
    npy = cache.path("S1", "flair")
    npy.write_bytes(npy.read_bytes()[:-100])
    (cache.dir / "S3" / "manifest.json").unlink()
    load_counter.clear()
    cache.ensure(list(CODES))
    assert sorted(load_counter) == sorted(["S1_flair.nii.gz"] + [f"S3_{s}.nii.gz" for s in SEQUENCES])
    assert cache.volume("S1", "flair").shape == (8, 40, 48)
    assert json.loads((cache.dir / "S3" / "manifest.json").read_text())["subject"] == "S3"


def test_cache_rebuilds_on_changed_settings(tmp_path, brats, cfg, load_counter):
    make_cache(tmp_path, brats, cfg).ensure(["S0"])
    load_counter.clear()
    make_cache(tmp_path, brats, DataConfig(n_slices=8, crop=16)).ensure(["S0"])  # crop is not cached
    assert load_counter == []
    cache = make_cache(tmp_path, brats, DataConfig(n_slices=8, percentile=95.0))
    cache.ensure(["S0"])
    assert len(load_counter) == 4
    # other settings, other folder: a run with the first settings still finds its cache intact
    assert cache.dir != make_cache(tmp_path, brats, cfg).dir
    load_counter.clear()
    make_cache(tmp_path, brats, cfg).ensure(["S0"])
    assert load_counter == []


def test_cache_files_and_checkpoints_follow_the_umask(tmp_path, brats, cfg):
    # mkstemp alone makes 0o600 files, which a group sharing a cache or run folder cannot read
    from vq.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        cache = make_cache(tmp_path, brats, cfg)
        cache.ensure(["S0"])
        ckpt = save_checkpoint({"model": {}}, tmp_path / "run" / "ckpt.pth")
    finally:
        os.umask(old)
    for path in (cache.path("S0", "t1"), cache.dir / "S0" / "manifest.json", ckpt):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_an_interrupted_rebuild_is_never_trusted(tmp_path, brats, cfg, load_counter, monkeypatch):
    cache = make_cache(tmp_path, brats, cfg)
    cache.ensure(["S2"])
    write_subject(brats, "S2", seed=99)  # new content for all four sequences
    for seq in SEQUENCES:
        source = brats / "S2" / f"S2_{seq}.nii.gz"
        os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    real, calls = vq.nifti.load_volume, []

    def killed_after_one(path, **kw):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the process dies after rewriting one .npy
        return real(path, **kw)

    monkeypatch.setattr(vq.nifti, "load_volume", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(["S2"])
    assert not (cache.dir / "S2" / "manifest.json").exists()
    monkeypatch.setattr(vq.nifti, "load_volume", real)
    cache.ensure(["S2"])
    expected = load_subject(brats, "S2", n_slices=8).transpose(0, 3, 1, 2)
    for i, seq in enumerate(SEQUENCES):
        np.testing.assert_allclose(cache.volume("S2", seq), expected[i], atol=1e-3)


def test_cache_builds_in_worker_processes(tmp_path, brats, cfg):
    pooled = SliceCache(tmp_path / "pooled", brats, cfg, workers=2)
    assert pooled.ensure(["S0", "S1"]) == ["S0", "S1"]
    serial = make_cache(tmp_path, brats, cfg)
    serial.ensure(["S0", "S1"])
    for name in ("S0", "S1"):
        np.testing.assert_array_equal(pooled.volume(name, "flair"), serial.volume(name, "flair"))


def test_cache_bad_subject_raises_or_is_skipped(tmp_path, brats, cfg, caplog):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), str(brats / "S1" / "S1_t1ce.nii.gz"))
    cache = make_cache(tmp_path, brats, cfg)
    with pytest.raises(BratsDataError, match=r"subject S1: .*S1_t1ce\.nii\.gz.*all zeros"):
        cache.ensure(list(CODES))
    assert cache.ensure(list(CODES), skip_bad=True) == ["S0", "S2", "S3"]
    assert "S1_t1ce" in caplog.text
    assert cache.ensure({"S1": ["t1", "t2"]}) == ["S1"]  # the bad file is not needed here


# --- training pairs and evaluation stacks ---

def test_pairs_follow_n_mod_3(tmp_path, brats, cfg):
    cache = make_cache(tmp_path, brats, cfg)
    cache.ensure(list(CODES))
    dataset = PairDataset(cache, list(CODES.items()), cfg, seed=0)
    expected = {"S0": {0, 1}, "S1": {1, 2}, "S2": {2, 3}, "S3": {2, 3}}
    seen = {name: set() for name in CODES}
    for key in range(10 * len(dataset)):
        item = dataset[key]
        assert {item["src_idx"], item["tgt_idx"]} == expected[item["name"]]
        seen[item["name"]].add(item["src_idx"])
    assert seen == expected  # both directions occur
    full = PairDataset(cache, list(CODES.items()), DataConfig(n_slices=8, crop=32, missing=False))
    assert len({(full[k]["src_idx"], full[k]["tgt_idx"]) for k in range(200)}) == 12


def test_pair_crop_and_flip_are_shared(tmp_path, brats, cfg):
    cache = make_cache(tmp_path, brats, cfg)
    cache.ensure(["S0"])
    dataset = PairDataset(cache, [("S0", 3)], DataConfig(n_slices=8, crop=32, slices_per_subject=4), seed=1)
    views = []
    for key in range(40):
        item = dataset[key]
        assert item["src"].shape == item["tgt"].shape == (1, 32, 32) and item["src"].dtype == torch.float32
        torch.testing.assert_close(item["src"], item["tgt"], atol=2e-3, rtol=0)  # t1 and t1ce normalise alike
        views.append(item["src"])
    assert len({v.sum().item() for v in views}) > 30  # slices/crops/flips really vary
    torch.testing.assert_close(dataset[7]["src"], views[7], atol=0, rtol=0)  # same key, same item


def test_train_loader_batches(tmp_path, brats):
    cfg = Config(data=DataConfig(root=str(brats), n_slices=8, crop=32, num_workers=0, slices_per_subject=1))
    cfg.train.batch_size = 2
    cache = make_cache(tmp_path, brats, cfg.data)
    loader = make_train_loader(cfg, cache, list(CODES.items()), seed=0)
    loader.sampler.set_epoch(3)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["src"].shape == (2, 1, 32, 32)
    assert batches[0]["src_idx"].dtype == torch.int64 and len(batches[0]["name"]) == 2


def test_an_epoch_draws_four_pairs_per_subject_in_a_row(tmp_path, brats):
    """The reference's epoch: each subject loaded once, 4 (slice, crop) draws from it in consecutive
    steps with one flip: 4 x subjects steps at batch 1."""
    cfg = Config(data=DataConfig(root=str(brats), n_slices=8, crop=32, num_workers=0))
    assert cfg.data.slices_per_subject == 4 and cfg.data.group_by_subject and cfg.train.batch_size == 1
    cache = make_cache(tmp_path, brats, cfg.data)
    loader = make_train_loader(cfg, cache, list(CODES.items()), seed=0)
    assert loader.sampler.batches_per_epoch == 4 * len(CODES)
    seen_flips = set()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        items = [loader.dataset[k] for k in loader.sampler]
        runs = [items[i:i + 4] for i in range(0, len(items), 4)]
        assert sorted(run[0]["name"] for run in runs) == sorted(CODES)  # each subject once per epoch
        for run in runs:
            assert len({item["name"] for item in run}) == 1
            flips = set()
            for item in run:  # each item is a crop of the cache, read as it is or mirrored
                volume = np.asarray(cache.volume(item["name"], item["src_idx"]), np.float32)
                image = item["src"][0].numpy()
                crops = [volume[z, x:x + 32, y:y + 32] for z in range(8) for x in range(9) for y in range(17)]
                mirrored = any(np.array_equal(image[::-1], crop) for crop in crops)
                assert mirrored or any(np.array_equal(image, crop) for crop in crops)
                flips.add(mirrored)
            assert len(flips) == 1  # one flip per loaded subject
            seen_flips.add(flips.pop())
    assert seen_flips == {True, False}  # and the flip is drawn: some subjects mirrored, some not


@pytest.mark.parametrize("offsets, last", [("reference", 47), ("full", 48)])
def test_crop_and_slice_offsets(tmp_path, brats, offsets, last):
    """The reference's randint(0, n - size - 1) never draws the last offset: on a 240-wide image a
    192 crop starts at 0..47, and of 128 slices 0..126 are drawn."""
    dataset = PairDataset(None, [("S0", 3)], DataConfig(offsets=offsets, crop=192), seed=0)
    rng = np.random.default_rng(0)
    starts = {dataset.offset(rng, 240, 192) for _ in range(3000)}
    slices = {dataset.offset(rng, 128, 1) for _ in range(5000)}
    assert starts == set(range(last + 1))
    assert slices == set(range(127 if offsets == "reference" else 128))
    assert dataset.offset(rng, 100, 192) == 0  # smaller than the crop: padded, offset 0


def test_eval_stack(tmp_path, brats, cfg):
    cache = make_cache(tmp_path, brats, cfg)
    cache.ensure(["S0"])
    stack = load_eval_stack(cache, "S0", "t2", 4)
    assert stack.shape == (4, 1, 32, 32) and stack.dtype == torch.float32
    full = np.asarray(cache.volume("S0", "t2"), np.float32)  # (8, 40, 48)
    np.testing.assert_array_equal(stack[:, 0].numpy(), full[2:6, 4:36, 8:40])
    assert load_eval_stack(cache, "S0", 2).shape == (8, 1, 32, 32)


# --- augmentation ---

def _images():
    images = torch.full((4, 1, 24, 24), -1.0)
    images[:, :, 4:20, 4:20] = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    return images


def test_augment_foreground_mode_changes_foreground_only():
    images = _images()
    out = IntensityAugment(p=1.0, p_skip=0.0, mode="foreground")(images, torch.Generator().manual_seed(0))
    fg = images > -1
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert ((out - images).abs()[fg] > 1e-4).float().mean() > 0.9
    assert (out[~fg] == -1).all()
    again = IntensityAugment(p=1.0, p_skip=0.0, mode="foreground")(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again, atol=0, rtol=0)


def test_augment_reference_mode_acts_on_the_whole_image_unclamped():
    """The reference's augmentation: background too, no clamp; with only the bias field on (scale
    0.2 U(0,1)), the change is a field whose range is exactly the scale and which is dominated by the
    x^2 y^2 term of raw pixel coordinates: largest change in a corner, not in the middle."""
    images = _images()
    out = IntensityAugment(p=1.0, p_skip=0.0)(images, torch.Generator().manual_seed(0))
    fg = images > -1
    assert (out[~fg] != -1).all() and (out < -1).any()  # background changed, values below -1 kept
    from vq.dataloader.augment import _reference_field
    coeffs = torch.zeros(1, 9)
    coeffs[0, 8] = 1.0  # x^2 y^2 alone
    field = _reference_field(coeffs, 24, 24)[0, 0]
    assert field[0, 0] == 0 and field[-1, -1] == 1 and field[12, 12] == pytest.approx((12 * 12 / 23 / 23) ** 2)
    coeffs = torch.randn(64, 9, generator=torch.Generator().manual_seed(2))
    fields = _reference_field(coeffs, 192, 192)[:, 0]
    row, col = fields.flatten(1).argmax(1) // 192, fields.flatten(1).argmax(1) % 192
    border = (row == 0) | (row == 191) | (col == 0) | (col == 191)
    assert border.all()  # the raw-coordinate polynomial (x^2 y^2 ~ 1e9) peaks on the border


def test_augment_skip_returns_input():
    images = _images()
    assert torch.equal(IntensityAugment(p=1.0, p_skip=1.0)(images), images)
    out = IntensityAugment()(images.repeat(16, 1, 1, 1), torch.Generator().manual_seed(1))
    unchanged = (out == images.repeat(16, 1, 1, 1)).flatten(1).all(1)
    assert 0 < unchanged.sum() < 64  # some samples skipped, some not


# --- data lists ---

def test_make_data_list(tmp_path, brats, capsys):
    paths = make_data_list(["--root", str(brats), "-o", str(tmp_path / "lists"), "--seed", "1"])
    names = [name for path in paths.values() for name, _ in read_list(path)]
    assert sorted(names) == sorted(CODES) and "train" in capsys.readouterr().out
    (brats / "S2" / "S2_seg.nii.gz").unlink()
    with pytest.raises(SystemExit, match=r"subject S2: missing file .*S2_seg\.nii\.gz"):
        make_data_list(["--root", str(brats), "-o", str(tmp_path / "lists")])


def test_codes_spread_evenly_and_small_splits_get_a_random_mix():
    import collections
    import random

    counts = collections.Counter(spread_codes(3 * len(PATTERNS) + 5, random.Random(0)))
    assert set(counts) == set(PATTERNS) and max(counts.values()) - min(counts.values()) == 1
    # a 6-subject split is not always patterns 1..6 (none of which has T1): over seeds, every pattern shows up
    small = [spread_codes(6, random.Random(seed)) for seed in range(20)]
    assert all(len(set(codes)) == 6 for codes in small)
    assert set().union(*small) == set(PATTERNS)
    assert sum(0 in available(code) for codes in small for code in codes) > 30


def test_data_list_errors(tmp_path):
    bad_code = tmp_path / "bad.csv"
    bad_code.write_text("A,3\nB,15\n")
    with pytest.raises(DataListError, match=r"bad\.csv:2: code 15 of B"):
        read_list(bad_code)
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("A,3\nA,4\n")
    with pytest.raises(DataListError, match="subject A listed twice"):
        read_list(duplicate)


def test_train_crop_is_drawn_inside_the_centred_crop():
    """data.train_crop: smaller training crops, all inside the centred `crop` window (where the brain is),
    covering it; pixel (x, y) of a slice holds x * 1000 + y, so each crop shows where it came from."""
    class Volumes:  # PairDataset reads only cache.volume(name, seq) -> (S, X, Y)
        def volume(self, name, seq):
            x, y = np.meshgrid(np.arange(240), np.arange(240), indexing="ij")
            return np.broadcast_to((x * 1000 + y).astype(np.float32), (4, 240, 240))

    dataset = PairDataset(Volumes(), [("S0", 3)], DataConfig(crop=192, train_crop=96, flip=False), seed=0)
    corners = set()
    for key in range(1500):
        image = dataset[key]["src"][0].numpy()  # (96, 96)
        x0, y0 = divmod(int(image[0, 0]), 1000)
        assert image.shape == (96, 96) and divmod(int(image[-1, -1]), 1000) == (x0 + 95, y0 + 95)
        corners.add((x0, y0))
    xs, ys = zip(*corners)
    # window 24..215; reference offsets: starts 0..95 of 0..96 in it (never the last, as for the full crop)
    assert (min(xs), max(xs), min(ys), max(ys)) == (24, 24 + 95, 24, 24 + 95)


def test_train_crop_not_below_the_crop_is_the_crop_and_must_suit_the_network():
    from vq.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.train_crop"):
        load_config(REPO_ROOT / "publications/config/vq/demo_phantom_cpu.yaml", ["data.train_crop=66"])
    volume = np.zeros((4, 40, 40), np.float32)
    dataset = PairDataset(type("Volumes", (), {"volume": lambda self, n, s: volume})(), [("S0", 3)],
                          DataConfig(crop=32, train_crop=64), seed=0)
    assert dataset[0]["src"].shape == (1, 32, 32)


# --- BraSyn naming (data.naming: brasyn) ---

@pytest.fixture
def brasyn(brats, tmp_path):
    """The same subjects in BraSyn naming: <case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz, S0 -> BraTS-GLI-00000-000 ..."""
    from vq.brasyn import to_brasyn_names

    root = tmp_path / "brasyn"
    to_brasyn_names(brats, root)
    return root


def test_brasyn_naming_reads_the_same_slices(brats, brasyn, tmp_path, cfg):
    assert (brasyn / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t2f.nii.gz").is_file()
    named = DataConfig(n_slices=8, crop=32, naming="brasyn")
    assert SliceCache(tmp_path / "c1", brasyn, named, workers=0).ensure(["BraTS-GLI-00002-000"]) == ["BraTS-GLI-00002-000"]
    SliceCache(tmp_path / "c2", brats, cfg, workers=0).ensure(["S2"])
    for seq in SEQUENCES:
        np.testing.assert_array_equal(SliceCache(tmp_path / "c1", brasyn, named).volume("BraTS-GLI-00002-000", seq),
                                      SliceCache(tmp_path / "c2", brats, cfg).volume("S2", seq))
    assert subject_files(brasyn, "BraTS-GLI-00002-000", ["seg"], "brasyn")["seg"].name == "BraTS-GLI-00002-000-seg.nii.gz"


def test_brasyn_and_the_dataloader_find_the_same_files_in_either_naming(brats, brasyn):
    """One naming rule (vq.sequences): the BraSyn tools and the data loader read the same file of each
    kind, `.nii` where only that exists."""
    from vq.brasyn import READ_NAMINGS, case_files
    from vq.sequences import BRASYN_NAMES, SEG, find_subject_file, subject_file

    for root, name, naming in ((brats, "S1", "brats2021"), (brasyn, "BraTS-GLI-00001-000", "brasyn")):
        t2 = root / name / subject_file(name, "t2", naming)
        nib.save(nib.load(str(t2)), str(t2.with_suffix("")))  # uncompressed only
        t2.unlink()
        loader = subject_files(root, name, naming=naming)
        assert loader["t2"].name.endswith(".nii")
        assert {BRASYN_NAMES[k]: v for k, v in loader.items() if k != SEG} == case_files(root / name)
        assert find_subject_file(root / name, SEG, READ_NAMINGS) == loader[SEG]


def test_the_wrong_naming_says_which_setting_to_use(brasyn, tmp_path, cfg):
    with pytest.raises(BratsDataError, match=r"BraTS-GLI-00000-000_t1\.nii\.gz.*set data\.naming: brasyn"):
        SliceCache(tmp_path / "cache", brasyn, cfg, workers=0).ensure(["BraTS-GLI-00000-000"])


def test_naming_is_a_checked_config_key():
    from vq.config import ConfigError, load_config

    assert load_config(None).data.naming == "brats2021"
    assert load_config(None, ["data.naming=brasyn"]).data.naming == "brasyn"
    with pytest.raises(ConfigError, match="data.naming must be brats2021 or brasyn"):
        load_config(None, ["data.naming=brats2023"])


def test_a_model_trains_on_brasyn_named_data(brasyn, tmp_path, capsys):
    from conftest import CONFIGS
    from vq.train.train_brats_vq_seq2seq_2d import main as train

    with pytest.raises(SystemExit, match="set data.naming: brasyn"):
        make_data_list(["--root", str(brasyn), "-o", str(brasyn)])
    make_data_list(["--root", str(brasyn), "-o", str(brasyn), "--naming", "brasyn"])
    assert {name for name, _ in read_list(brasyn / "train.csv")} <= {p.name for p in brasyn.iterdir() if p.is_dir()}
    overrides = [f"data.root={brasyn}", "data.naming=brasyn", f"data.cache_dir={tmp_path}/cache", f"out_dir={tmp_path}/run",
                 "model.base_channels=4", "model.n_res=1", "model.n_kernels=2", "model.n_embed=16", "data.crop=32",
                 "data.n_slices=8", "data.slices_per_subject=1", "data.num_workers=0", "train.batch_size=2",
                 "train.val_slices=2", "train.lambda_per=0", "train.max_steps=1"]
    assert train(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *overrides]) == 0
    assert (tmp_path / "run" / "ckpt_last.pth").is_file()
