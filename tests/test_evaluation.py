"""The evaluation protocol (test script), its tables, and the synthesis tool, on the phantom and a tiny trained model."""
from __future__ import annotations

import csv
import logging
import math
import urllib.error

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import CONFIGS
from vq import metrics
from vq.checkpoint import load_model_weights, read_checkpoint
from vq.config import load_config
from vq.dataloader.brats import SliceCache
from vq.dataloader.datasets import load_eval_stack
from vq.dataloader.lists import read_list, write_list
from vq.dataloader.preprocess import normalize
from vq.evaluation import METRIC_COLUMNS, SUMMARY_COLUMNS, Translation, Translator, save_prediction, score, \
    summarize, summary_markdown, translations_for, write_summary
from vq.models import build_model
from vq.nifti import to_intensity
from vq.runtime import amp_dtype
from vq.sequences import SEQUENCES, available, missing
from vq.test.test_brats_vq_2d_metrics import main as evaluate_main
from vq.tools.synthesize import main as synthesize_main

CONFIG = CONFIGS / "demo_phantom_cpu.yaml"
MULTI_STEP = [["t1", "t1ce", "t2"], ["t1", "t1ce", "t2", "flair"]]


def read_csv(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def canonical(path) -> np.ndarray:
    """A NIfTI file's data in RAS+ voxel order, by nibabel alone."""
    return nib.as_closest_canonical(nib.load(str(path))).get_fdata(dtype=np.float32)


def crop_box(cfg, shape) -> tuple[slice, slice, slice]:
    """The (X, Y, Z) region of a RAS+ grid that the test stacks cover: centre crop (all of an axis
    shorter than the crop), central slices."""
    def centred(length, size):
        start = max(length - size, 0) // 2
        return slice(start, start + min(size, length))

    (x, y, z), crop = shape, cfg.data.crop
    return centred(x, crop), centred(y, crop), centred(z, cfg.data.n_slices)


def expected_rows(subjects, multi_step) -> tuple[list[tuple], list[tuple]]:
    """(name, src, tgt, steps) of the single-step and the multi-step rows, from the list codes alone."""
    single = [(name, SEQUENCES[s], SEQUENCES[t], f"{s}>{t}")
              for name, code in subjects for s in available(code) for t in missing(code)]
    multi = [(name, SEQUENCES[tr.src], SEQUENCES[tr.tgt], tr.steps)
             for name, code in subjects for tr in translations_for(code, multi_step) if tr.multi]
    return single, multi


def keys(rows) -> list[tuple]:
    return sorted((r["name"], r["src"], r["tgt"], r["steps"]) for r in rows)


def no_network(url, *args, **kwargs):
    raise urllib.error.URLError(f"no network in tests: {url}")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache, no network, and the once-per-process LPIPS warning not yet given."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # what torch.hub.set_dir sets
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(metrics, "_lpips_warned", False)


@pytest.fixture(scope="module")
def evaluated(trained_run, phantom_dir, alexnet_weights_file, tmp_path_factory):
    """The test script run once with LPIPS weights, on the test subjects recoded so that multi-step rows occur."""
    overrides, run_dir = trained_run
    work = tmp_path_factory.mktemp("evaluated")
    (a, _), (b, _) = read_list(phantom_dir / "test.csv")
    # t1 only: 3 single + 2 multi-step rows; t1 and flair: 4 single + the 0>1>2 path
    write_list(work / "lists" / "test.csv", [(a, 0b1000), (b, 0b1001)])
    overrides = overrides + [f"data.lists={work / 'lists'}"]
    out = work / "results"
    code = evaluate_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"), "-o", str(out),
                          "--lpips-weights", str(alexnet_weights_file), "--set", *overrides])
    cfg = load_config(CONFIG, overrides)
    return code, out, cfg, run_dir


# ----------------------------------------------------------------------------- the test script
def test_script_writes_a_row_per_translation_and_the_summary(evaluated):
    code, out, cfg, _ = evaluated
    assert code == 0
    subjects = read_list(cfg.lists_dir / "test.csv")
    single, multi = expected_rows(subjects, cfg.test.multi_step)
    assert multi, "the recoded list must give multi-step rows"

    header, rows = read_csv(out / "result_metrics.csv")
    assert header == METRIC_COLUMNS
    assert header[:8] == ["name", "src", "tgt", "psnr", "ssim", "lpips", "steps", "lpips_mean"]  # the reference's first
    assert keys(rows) == sorted(single + multi)
    header, baseline = read_csv(out / "baseline_metrics.csv")
    assert header == METRIC_COLUMNS and keys(baseline) == sorted(single + multi)  # a baseline for every row
    copies = {(r["name"], r["src"], r["tgt"], r["steps"]): r["psnr"] for r in baseline}
    for name, src, tgt, steps in multi:  # copying ignores the path: the single-step copy's scores
        assert copies[name, src, tgt, steps] == copies[name, src, tgt, f"{SEQUENCES.index(src)}>{SEQUENCES.index(tgt)}"]
    for row in rows + baseline:
        assert math.isfinite(float(row["psnr"])) and -1 < float(row["ssim"]) <= 1
        # lpips is the per-volume sum over the n_slices slices, lpips_mean the per-slice mean
        assert float(row["lpips"]) == pytest.approx(float(row["lpips_mean"]) * cfg.data.n_slices, rel=1e-4)
        assert float(row["lpips_mean"]) > 0

    header, summary = read_csv(out / "summary.csv")
    assert header == SUMMARY_COLUMNS
    groups = {(s["method"], s["steps"], s["src"], s["tgt"]): int(s["n"]) for s in summary}
    assert sum(n for (method, *_), n in groups.items() if method == "model") == len(rows)
    assert sum(n for (method, *_), n in groups.items() if method == "copy_source") == len(baseline)
    assert {steps for (method, steps, *_) in groups if method == "model"} == {"single", "multiple"}
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert table[0].startswith("| step | method |") and set(table[1]) == set("|-")
    assert len(table) == 2 * (2 + 4)  # whole image and brain: single and multiple, each model and copy_source
    assert "PSNR / SSIM / contrast error / order kept" in table[6]


def test_brain_and_contrast_columns_and_figures(evaluated):
    """On the phantom every row has brain-region scores and the tissue contrast (its tissue maps); the copy
    of a T1 as a T2 keeps T1's tissue order, which T2 reverses, so its order is never kept."""
    _, out, cfg, _ = evaluated
    _, rows = read_csv(out / "result_metrics.csv")
    _, baseline = read_csv(out / "baseline_metrics.csv")
    for row in rows + baseline:
        assert math.isfinite(float(row["psnr_brain"]))
        assert -1 < float(row["ssim_brain"]) <= 1 and float(row["contrast_error"]) >= 0
        assert row["tissue_order"] in ("0", "1")
    t1_as_t2 = [r for r in baseline if (r["src"], r["tgt"]) == ("t1", "t2")]
    assert t1_as_t2 and all(r["tissue_order"] == "0" for r in t1_as_t2)
    header, contrast = read_csv(out / "tissue_contrast.csv")
    assert {r["tissue"] for r in contrast} >= {"csf", "gm"} and {r["reference"] for r in contrast} == {"wm"}
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert figures == sorted({r["name"] for r in rows})


def test_predictions_are_written_in_the_source_geometry(evaluated, phantom_dir):
    _, out, cfg, run_dir = evaluated
    _, rows = read_csv(out / "result_metrics.csv")
    written = sorted((out / "nifti").rglob("*.nii.gz"))
    assert len(written) == len(rows)
    model = build_model(cfg.model)
    load_model_weights(model, read_checkpoint(run_dir / "ckpt_best.pth"), run_dir / "ckpt_best.pth")
    cpu = torch.device("cpu")
    translator = Translator(model, cpu, amp_dtype(cpu, cfg.test.amp), cfg.test.batch_size)  # as the script
    cache = SliceCache(cfg.data.cache_dir, phantom_dir, cfg.data)
    for row in rows:
        path_ids = [int(i) for i in row["steps"].split(">")]
        via = "_via_" + "_".join(SEQUENCES[i] for i in path_ids[1:-1]) if len(path_ids) > 2 else ""
        name = row["name"]
        file = out / "nifti" / name / f"{name}_{row['tgt']}_from_{row['src']}{via}.nii.gz"
        source = nib.load(str(phantom_dir / name / f"{name}_{row['src']}.nii.gz"))
        image = nib.load(str(file))
        assert image.shape == source.shape == (240, 240, 155), file
        assert np.allclose(image.affine, source.affine), file

        data = canonical(file)
        box = crop_box(cfg, data.shape)
        pred = translator.translate(load_eval_stack(cache, name, path_ids[0]), path_ids)  # (S, 1, crop, crop)
        assert np.allclose(data[box], to_intensity(pred[:, 0].numpy()).transpose(1, 2, 0), atol=1e-5), file
        assert data[box].std() > 0
        data[box] = 0
        assert not data.any(), f"{file}: values outside the evaluated region"


@pytest.mark.parametrize("crop", [64, 256])  # a crop, and a pad beyond the 240 x 240 grid
def test_a_pasted_source_overlays_the_source_file(trained_run, phantom_dir, tmp_path, crop):
    """Geometry alone, whatever the model: the source's own test stack written back matches the source file."""
    overrides, _ = trained_run
    cfg = load_config(CONFIG, overrides + [f"data.crop={crop}"])
    name, _ = read_list(phantom_dir / "test.csv")[0]
    cache = SliceCache(cfg.data.cache_dir, phantom_dir, cfg.data)
    cache.ensure({name: ["t2"]})
    path = save_prediction(load_eval_stack(cache, name, 2), phantom_dir, name, Translation(2, 0, [2, 0]), cfg,
                           tmp_path)
    assert path.name == f"{name}_t1_from_t2.nii.gz"
    source_file = phantom_dir / name / f"{name}_t2.nii.gz"
    assert np.allclose(nib.load(str(path)).affine, nib.load(str(source_file)).affine)
    written, source = canonical(path), canonical(source_file)
    box = crop_box(cfg, source.shape)
    expected = to_intensity(normalize(source, cfg.data.percentile))
    assert np.abs(written[box] - expected[box]).max() < 1e-3  # float16 cache
    assert (written[box] > 0).sum() > 0.2 * written[box].size  # the box holds brain, not background
    written[box] = 0
    assert not written.any()


def test_lpips_without_weights_leaves_empty_cells_and_warns_once(trained_run, offline_hub, tmp_path, caplog):
    overrides, run_dir = trained_run
    with caplog.at_level(logging.WARNING):
        code = evaluate_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"),
                              "-o", str(tmp_path / "out"), "--list", "valid.csv",
                              "--set", *overrides, "test.save_nifti=false"])
    assert code == 0
    for table in ("result_metrics.csv", "baseline_metrics.csv"):
        _, rows = read_csv(tmp_path / "out" / table)
        assert rows and all(r["lpips"] == "" and r["lpips_mean"] == "" and r["psnr"] for r in rows)
    _, summary = read_csv(tmp_path / "out" / "summary.csv")
    assert all(s["lpips"] == "" and s["lpips_std"] == "" for s in summary)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "alexnet" in r.getMessage().lower()]
    assert len(warned) == 1 and "\n" not in warned[0].getMessage()
    assert not (tmp_path / "out" / "nifti").exists()


def test_results_are_not_overwritten_without_flag(evaluated, caplog):
    _, out, _, run_dir = evaluated
    before = (out / "result_metrics.csv").stat().st_mtime_ns
    with caplog.at_level(logging.ERROR):
        code = evaluate_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"), "-o", str(out)])
    assert code != 0
    assert any(str(out) in r.getMessage() and "--overwrite" in r.getMessage() for r in caplog.records)
    assert (out / "result_metrics.csv").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- translations and tables
def test_translations_single_and_multi_step():
    found = translations_for(0b1000, MULTI_STEP)  # t1 only (codes: t1 t1ce t2 flair, most significant first)
    assert [t.steps for t in found if not t.multi] == ["0>1", "0>2", "0>3"]
    assert [t.steps for t in found if t.multi] == ["0>1>2", "0>1>2>3"]
    assert [(t.src, t.tgt) for t in found if t.multi] == [(0, 2), (0, 3)]
    # a path whose start is missing, or whose end is available, is not evaluated
    assert not [t for t in translations_for(0b0100, MULTI_STEP) if t.multi]  # t1ce only
    assert [t.steps for t in translations_for(0b1010, MULTI_STEP) if t.multi] == ["0>1>2>3"]


def test_translator_multi_step_is_decoding_twice(trained_run):
    overrides, _ = trained_run
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, overrides).model).eval()
    stack = torch.rand(5, 1, 32, 32) * 2 - 1
    got = Translator(model, torch.device("cpu"), None, batch_size=3).translate(stack, [0, 1, 2])  # chunks 3 + 2
    with torch.no_grad():
        by_hand = model.decode(model.encode(model.decode(model.encode(stack, 0).latent, 1), 1).latent, 2)
    assert got.shape == (5, 1, 32, 32)
    assert torch.allclose(got, by_hand, atol=1e-5)


def test_summary_means_stds_and_table():
    def row(method, steps, name, psnr, ssim, lpips):
        src, tgt = (SEQUENCES[int(steps[0])], SEQUENCES[int(steps[-1])])
        return {"method": method, "steps": steps, "name": name, "src": src, "tgt": tgt,
                "psnr": psnr, "ssim": ssim, "lpips": lpips}

    rows = [row("model", "0>2", "a", 20.0, 0.8, 8.0), row("model", "0>2", "b", 24.0, 0.9, 10.0),
            row("model", "0>1>2", "a", 30.0, 0.7, 6.0),
            row("copy_source", "0>2", "a", 10.0, 0.5, math.nan), row("copy_source", "0>2", "b", 12.0, 0.3, math.nan)]
    summary = summarize(rows)
    by_key = {(e["method"], e["steps"]): e for e in summary}
    assert [(e["method"], e["steps"]) for e in summary] == [("model", "single"), ("model", "multiple"),
                                                            ("copy_source", "single")]
    single = by_key["model", "single"]
    assert (single["src"], single["tgt"], single["n"]) == ("t1", "t2", 2)
    assert single["psnr"] == pytest.approx(22.0) and single["psnr_std"] == pytest.approx(2.0)
    assert single["ssim"] == pytest.approx(0.85) and single["lpips"] == pytest.approx(9.0)
    assert by_key["model", "multiple"]["n"] == 1 and by_key["model", "multiple"]["psnr"] == 30.0
    copy = by_key["copy_source", "single"]
    assert copy["psnr"] == pytest.approx(11.0) and math.isnan(copy["lpips"])

    table = [line for line in summary_markdown(summary).splitlines() if line.startswith("|")]
    assert "T1->T2 PSNR / SSIM / LPIPS" in table[0]
    assert table[2] == "| single | model | 22.0 / 0.850 / 9.00 (n=2) |"
    assert table[3] == "| single | copy_source | 11.0 / 0.400 / n/a (n=2) |"
    assert table[4] == "| multiple | model | 30.0 / 0.700 / 6.00 (n=1) |"


def test_summary_csv_leaves_missing_lpips_empty(tmp_path):
    rows = [{"method": "copy_source", "steps": "0>2", "src": "t1", "tgt": "t2", "psnr": 10.0, "ssim": 0.5,
             "lpips": math.nan}]
    write_summary(summarize(rows), tmp_path / "summary.csv", tmp_path / "summary.md")
    header, (entry,) = read_csv(tmp_path / "summary.csv")
    assert header == SUMMARY_COLUMNS
    assert entry["psnr"] == "10" and entry["lpips"] == "" and entry["lpips_std"] == ""
    assert entry["psnr_brain"] == "" and entry["contrast_error"] == ""  # rows without those scores
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("## Whole image\n\n| step | method |") and "| single | copy_source | n/a / n/a" in text


# ----------------------------------------------------------------------------- synthesis
@pytest.fixture(scope="module")
def small_scans(phantom_dir, tmp_path_factory):
    """t1 and t2 of a phantom subject cut to an odd-sized block (not a multiple of 4), and t1 reoriented."""
    name, _ = read_list(phantom_dir / "test.csv")[0]
    folder = tmp_path_factory.mktemp("scans")
    files = {}
    for seq in ("t1", "t2"):
        block = nib.load(str(phantom_dir / name / f"{name}_{seq}.nii.gz")).slicer[96:144, 96:150, 75:84]
        files[seq] = folder / f"{seq}.nii.gz"
        nib.save(block, str(files[seq]))
    # voxel axes permuted and flipped: (L, P, S) storage -> (A, R, I); the affine follows
    t1 = nib.load(str(files["t1"]))
    reoriented = t1.as_reoriented(np.array([[1, -1], [0, -1], [2, -1]]))
    files["t1_reoriented"] = folder / "t1_reoriented.nii.gz"
    nib.save(reoriented, str(files["t1_reoriented"]))
    assert reoriented.shape == (54, 48, 9) and not np.allclose(reoriented.affine, t1.affine)
    return files


def synthesize(trained_run, out, *args) -> int:
    overrides, run_dir = trained_run
    return synthesize_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"), "-o", str(out),
                            *args, "--set", *overrides])


def test_synthesize_two_sources_fused_and_uncertainty(trained_run, small_scans, tmp_path):
    code = synthesize(trained_run, tmp_path, "--src", "t1", str(small_scans["t1"]), "--src", "t2",
                      str(small_scans["t2"]), "--tgt", "t1ce", "flair", "--samples", "2")
    assert code == 0
    source = nib.load(str(small_scans["t1"]))
    for tgt in ("t1ce", "flair"):
        outputs = {kind: nib.load(str(tmp_path / f"{tgt}_{kind}.nii.gz"))
                   for kind in ("from_t1", "from_t2", "fused", "mean", "std")}
        for kind, image in outputs.items():
            assert image.shape == source.shape == (48, 54, 9), (tgt, kind)
            assert np.allclose(image.affine, source.affine), (tgt, kind)
            data = image.get_fdata()
            assert 0 <= data.min() and data.max() <= 1 and data.std() > 0, (tgt, kind)
        assert not np.allclose(outputs["fused"].get_fdata(), outputs["from_t1"].get_fdata())


def test_synthesize_keeps_any_orientation(trained_run, small_scans, tmp_path):
    assert synthesize(trained_run, tmp_path / "plain", "--src", "t1", str(small_scans["t1"]), "--tgt", "flair") == 0
    assert synthesize(trained_run, tmp_path / "turned", "--src", "t1", str(small_scans["t1_reoriented"]),
                      "--tgt", "flair") == 0
    turned_in, turned_out = (nib.load(str(small_scans["t1_reoriented"])),
                             nib.load(str(tmp_path / "turned" / "flair_from_t1.nii.gz")))
    assert turned_out.shape == turned_in.shape and np.allclose(turned_out.affine, turned_in.affine)
    plain, turned = canonical(tmp_path / "plain" / "flair_from_t1.nii.gz"), canonical(tmp_path / "turned" /
                                                                                     "flair_from_t1.nii.gz")
    assert plain.shape == turned.shape and plain.std() > 0
    assert np.allclose(plain, turned, atol=1e-5)


def test_a_shared_memo_computes_shared_prefixes_once(trained_run, monkeypatch):
    overrides, _ = trained_run
    torch.manual_seed(0)
    translator = Translator(build_model(load_config(CONFIG, overrides).model), torch.device("cpu"), None, 4)
    stack = torch.rand(5, 1, 32, 32) * 2 - 1
    paths = [[0, 1], [0, 2], [0, 3], [0, 1, 2], [0, 1, 2, 3]]
    alone = [translator.translate(stack, path) for path in paths]
    calls = {"encode": 0, "decode": 0}
    for name in calls:
        method = getattr(translator, name)
        monkeypatch.setattr(translator, name, lambda *a, _m=method, _n=name: calls.__setitem__(_n, calls[_n] + 1)
                            or _m(*a))
    memo = {}
    shared = [translator.translate(stack, path, memo) for path in paths]
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)
    # encodings: the source, its T1Gd, its T2 (not 1 + 1 + 1 + 2 + 3); decodings: 3 + 1 + 1 (not 9)
    assert calls == {"encode": 3, "decode": 5}


def test_tumour_and_nontumour_scores_see_where_the_error_is():
    """An error of 0.1 inside the segmentation only: the tumour PSNR is 10 log10(4 / 0.01), the rest of
    the brain is exact (infinite PSNR, SSIM 1); the whole-brain PSNR lies between."""
    from vq.evaluation import SubjectLabels

    target = torch.full((8, 1, 24, 24), -1.0)
    target[:, :, 4:20, 4:20] = 0.2
    tumour = torch.zeros(8, 24, 24, dtype=torch.bool)
    tumour[:, 8:12, 8:12] = True
    pred = target.clone()
    pred[:, 0][tumour] += 0.1
    row = score(pred, target, None, SubjectLabels(None, None, tumour))
    assert row["psnr_tumour"] == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    assert row["psnr_nontumour"] == float("inf") and row["ssim_nontumour"] < 1.0  # the SSIM window sees the edge
    assert row["psnr_tumour"] < row["psnr_brain"] < row["psnr_nontumour"]
    assert "psnr_tumour" not in score(pred, target, None)  # no segmentation: empty cells in the CSV
    text = summary_markdown(summarize([{**row, "name": "A", "src": "t1", "tgt": "t2", "steps": "0>2",
                                        "method": "model"}]))
    tumour_table = [line for line in text.split("## Inside and outside the tumour")[1].splitlines()
                    if line.startswith("|")]
    assert [line.count("|") for line in tumour_table] == [4, 4, 4]  # one cell per translation, a proper table
    assert "26.0 / " in tumour_table[2] and "inf / 1.000" not in tumour_table[2]


def test_demo_goal_counts_each_part(tmp_path):
    """vq.report: per single-step translation, model against copy; a translation meets the demo's goal
    only with brain and whole-image PSNR above the copy, the tissue order kept in every subject and a
    small contrast error. Written through write_summary and read back, as tools/demo_curve.py does."""
    from vq.report import GOAL_CONTRAST_ERROR, compare_with_copy, goal_row, read_summary

    def entry(method, src, tgt, psnr_brain, ssim_brain, error, order, steps="single", psnr=None):
        row = {"method": method, "steps": steps, "src": src, "tgt": tgt, "n": 2}
        row.update({key: math.nan for key in SUMMARY_COLUMNS if key not in row})
        row.update(psnr_brain=psnr_brain, ssim_brain=ssim_brain, contrast_error=error, tissue_order=order,
                   psnr=psnr_brain + 3 if psnr is None else psnr)
        return row

    good = GOAL_CONTRAST_ERROR / 2
    summary = [entry("model", "t1", "t2", 24.0, 0.70, good, 1.0), entry("copy_source", "t1", "t2", 14.0, 0.10, 1.2, 0.0),
               entry("model", "t2", "flair", 22.0, 0.60, good, 0.5), entry("copy_source", "t2", "flair", 15.0, 0.2, 1.0, 0.0),
               entry("model", "t1", "t1ce", 21.0, 0.50, 0.3, 1.0), entry("copy_source", "t1", "t1ce", 23.0, 0.8, 0.2, 1.0),
               # brain PSNR, order and contrast met, whole-image PSNR below the copy's: not the goal
               entry("model", "t1ce", "t2", 22.0, 0.60, good, 1.0, psnr=20.0),
               entry("copy_source", "t1ce", "t2", 14.0, 0.10, 1.2, 0.0, psnr=21.0),
               entry("model", "t1", "flair", 30.0, 0.9, good, 1.0, steps="multiple"),
               entry("copy_source", "t1", "flair", 10.0, 0.1, 1.0, 0.0, steps="multiple")]
    write_summary(summary, tmp_path / "summary.csv", tmp_path / "summary.md")
    comparisons = compare_with_copy(read_summary(tmp_path / "summary.csv"))
    assert [(c.src, c.tgt, c.meets_goal) for c in comparisons] == [
        ("t1", "t1ce", False), ("t1", "t2", True), ("t1ce", "t2", False), ("t2", "flair", False)]
    row = goal_row(comparisons)  # single steps only, in Table 1 order
    assert (row["translations"], row["beats_copy_psnr"], row["beats_copy_psnr_whole"], row["beats_copy_ssim"],
            row["order_kept"], row["small_contrast_error"], row["meets_goal"]) == (4, 3, 2, 3, 3, 3, 1)
    assert row["psnr_brain"] == pytest.approx((24 + 22 + 21 + 22) / 4) and row["copy_psnr_brain"] == pytest.approx(66 / 4)
    assert row["tissue_order"] == pytest.approx(3.5 / 4)


def test_fewer_test_slices_score_and_write_the_central_ones(trained_run, phantom_dir, tmp_path):
    """test.n_slices (the CPU demo's quicker evaluation): the copy baseline is scored on the central n
    slices of the stacks, and the predictions fill exactly those slices of the NIfTI output."""
    overrides, run_dir = trained_run
    (name, code), = read_list(phantom_dir / "test.csv")[:1]
    write_list(tmp_path / "lists" / "test.csv", [(name, code)])
    overrides = overrides + [f"data.lists={tmp_path / 'lists'}", "test.n_slices=8", "test.multi_step=[]"]
    assert evaluate_main(["-d", "cpu", "-c", str(CONFIG), "-l", str(run_dir / "ckpt_best.pth"),
                          "-o", str(tmp_path / "out"), "--set", *overrides]) == 0
    cfg = load_config(CONFIG, overrides)
    cache = SliceCache(cfg.data.cache_dir, phantom_dir, cfg.data)
    _, baseline = read_csv(tmp_path / "out" / "baseline_metrics.csv")
    row = baseline[0]
    full = {s: load_eval_stack(cache, name, s)[:, 0] for s in (row["src"], row["tgt"])}  # (n_slices, crop, crop)
    mid = cfg.data.n_slices // 2
    central = {s: stack[mid - 4:mid + 4] for s, stack in full.items()}
    assert float(row["psnr"]) == pytest.approx(float(metrics.psnr(central[row["src"]], central[row["tgt"]])), abs=1e-4)
    assert float(row["psnr"]) != pytest.approx(float(metrics.psnr(full[row["src"]], full[row["tgt"]])), abs=1e-2)
    written = next((tmp_path / "out" / "nifti" / name).glob("*.nii.gz"))
    filled = np.flatnonzero(canonical(written).any(axis=(0, 1)))
    z = canonical(written).shape[2]
    start = (z - cfg.data.n_slices) // 2 + mid - 4
    assert list(filled) == list(range(start, start + 8))


def test_demo_curve_reads_runs_and_writes_table_and_figure(tmp_path):
    """tools/demo_curve.py: one row per run with its steps and minutes (the last log row's elapsed_s),
    the goal counts from its evaluation, the table and the figure; a run not evaluated is named."""
    from vq.tools.demo_curve import main as curve_main

    def entry(method, src, tgt, psnr_brain):
        row = {key: math.nan for key in SUMMARY_COLUMNS}
        row.update(method=method, steps="single", src=src, tgt=tgt, n=1, psnr_brain=psnr_brain, psnr=psnr_brain + 3,
                   ssim_brain=0.6 if method == "model" else 0.5, contrast_error=0.1, tissue_order=1.0)
        return row

    for name, psnr_brain in (("short", 19.0), ("long", 23.0)):
        run = tmp_path / name
        (run / "results").mkdir(parents=True)
        (run / "log.csv").write_text("step,val_psnr_brain,elapsed_s\n10,,30.0\n20,18.5,66.0\n24,,90.0\n")
        write_summary([entry("model", "t1", "t2", psnr_brain), entry("copy_source", "t1", "t2", 20.0)],
                      run / "results" / "summary.csv", run / "results" / "summary.md")
    assert curve_main([str(tmp_path / "short"), str(tmp_path / "long"), "-o", str(tmp_path / "out")]) == 0
    _, rows = read_csv(tmp_path / "out" / "demo_curve.csv")
    assert [(r["run"], r["steps"], float(r["minutes"]), r["beats_copy_psnr"], r["meets_goal"]) for r in rows] == [
        ("short", "24", 1.5, "0", "0"), ("long", "24", 1.5, "1", "1")]
    assert (tmp_path / "out" / "demo_curve.png").stat().st_size > 10_000
    assert "| long | 24 | 1.5 | 23.00 / 20.00 |" in (tmp_path / "out" / "demo_curve.md").read_text()
    (tmp_path / "long" / "results" / "summary.csv").unlink()
    assert curve_main([str(tmp_path / "long"), "-o", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_setting_is_a_valid_config_that_pins_what_the_demo_changed(path):
    """Each study's settings load over the demo config, and what a setting does not change is pinned to the
    recipe before the source-conditioned encoder (the paper's encoder, consistency weight 10, domain
    augmentation, fp32), although the demo config has moved on: a re-run measures what the tables show."""
    from vq.tools.demo_study import read_study

    study = read_study(path)
    for overrides in study.settings.values():
        load_config(study.config, study.common + overrides)
    assert any(o.startswith("train.pretrain_epochs_contrast=") for o in study.common)  # on or off, stated
    common = load_config(study.config, study.common)  # what a setting does not change
    assert (common.model.source_code, common.train.lambda_con, common.train.domain_aug, common.train.amp) == \
        (False, 10.0, True, "none")
