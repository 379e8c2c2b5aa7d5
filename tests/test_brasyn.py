"""BraSyn: the challenge's random drop, folder completion and metrics, on the phantom in BraSyn naming."""
from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest

from conftest import CONFIGS
from vq.brasyn import BRASYN_NAMES, brasyn_normalize, brasyn_scores, case_files, to_brasyn_names
from vq.nifti import load_volume
from vq.tools.brasyn import main as brasyn_main


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_normalisation_clips_to_the_volume_percentiles():
    volume = np.concatenate([np.zeros(500), np.linspace(0, 100, 1000), np.full(5, 1e4)]).astype(np.float32)
    out = brasyn_normalize(volume)
    high = np.percentile(volume, 99.5)  # inside the ramp: the 5 outliers are clipped away
    assert out.min() == 0 and out.max() == 1 and high < 100
    np.testing.assert_allclose(out[500:1000:100], np.linspace(0, 100, 1000)[:500:100] / high, rtol=1e-5)
    shifted = brasyn_normalize(volume - 50)  # negative values: the lower bound is raised to 0
    assert shifted[0] == 0 and float(np.percentile(volume - 50, 0.5)) < 0


def test_scores_known_values_inside_and_outside_the_tumour():
    """[0, 1] volumes whose percentiles are 0 and 1, so normalisation changes nothing; the prediction
    differs by 0.1 inside the tumour only: MSE 0.01 and PSNR 20 dB there, a perfect rest."""
    rng = np.random.default_rng(0)
    real = np.zeros((32, 32, 32), np.float32)
    real[4:28, 4:28, 4:28] = rng.uniform(0.2, 0.8, (24, 24, 24))
    real[0, 0, :] = 1.0  # more than 0.5 % of voxels at 0 and a maximum of 1
    real[1, :, :] = 1.0
    seg = np.zeros(real.shape, np.uint8)
    seg[12:20, 12:20, 12:20] = 2
    pred = real.copy()
    pred[seg > 0] += 0.1
    scores = brasyn_scores(pred, real, seg)
    assert scores["mse_tumour"] == pytest.approx(0.01, rel=1e-4) and scores["psnr_tumour"] == pytest.approx(20, rel=1e-4)
    assert scores["mse_nontumour"] == 0 and scores["psnr_nontumour"] == math.inf
    assert scores["ssim_nontumour"] == pytest.approx(1.0) and 0 < scores["ssim_tumour"] < 1
    same = brasyn_scores(real, real, seg)
    assert same["ssim_tumour"] == pytest.approx(1.0) and same["mse_tumour"] == 0
    no_tumour = brasyn_scores(pred, real, np.zeros_like(seg))
    assert math.isnan(no_tumour["ssim_tumour"]) and math.isnan(no_tumour["psnr_tumour"])


@pytest.fixture(scope="module")
def brasyn_phantom(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("brasyn")
    names = to_brasyn_names(phantom_dir, root / "complete")
    return root, names


def test_the_challenges_drop_and_the_phantom_in_brasyn_naming(brasyn_phantom, capsys):
    root, names = brasyn_phantom
    assert names[0] == "BraTS-GLI-00000-000" and len(names) == 6
    assert set(case_files(root / "complete" / names[0])) == set(BRASYN_NAMES.values())
    assert brasyn_main(["drop", "--root", str(root / "complete"), "-o", str(root / "dropped")]) == 0
    dropped = read_csv(root / "dropped" / "dropped.csv")
    # NumPy's legacy RNG seeded 123456: randint(0, 4, size=6) = 1 2 2 1 0 3 over (t1c, t1n, t2f, t2w)
    assert [r["dropped"] for r in dropped] == ["t1n", "t2f", "t2f", "t1n", "t1c", "t2w"]
    assert [r["case"] for r in dropped] == sorted(names)
    for row in dropped:
        present = case_files(root / "dropped" / row["case"])
        assert len(present) == 3 and row["dropped"] not in present
        assert not list((root / "dropped" / row["case"]).glob("*seg*"))


def test_complete_and_score_the_dropped_phantom(brasyn_phantom, trained_run, tmp_path, capsys, caplog):
    overrides, run_dir = trained_run
    root, names = brasyn_phantom
    dropped = root / "dropped"
    if not dropped.exists():
        assert brasyn_main(["drop", "--root", str(root / "complete"), "-o", str(dropped)]) == 0
    broken = tmp_path / "in"  # the dropped set plus a case missing two files
    shutil.copytree(dropped, broken)
    extra = broken / "BraTS-GLI-00099-000"
    shutil.copytree(dropped / names[0], extra)
    for path in list(extra.iterdir())[:1]:
        path.rename(extra / path.name.replace(names[0], "BraTS-GLI-00099-000"))
    out = tmp_path / "completed"
    model = ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "-l", str(run_dir / "ckpt_best.pth")]
    code = brasyn_main(["complete", *model, "--root", str(broken), "-o", str(out), "--set", *overrides])
    assert code == 1 and "BraTS-GLI-00099-000" in caplog.text  # reported and skipped, the rest done
    single = tmp_path / "one"  # --flat: the challenge's flat output folder
    shutil.copytree(dropped / names[0], single / names[0])
    assert brasyn_main(["complete", *model, "--root", str(single), "-o", str(tmp_path / "flat"), "--flat",
                        "--set", *overrides]) == 0
    assert [p.name for p in (tmp_path / "flat").iterdir()] == [f"{names[0]}-t1n.nii.gz"]
    plan = read_csv(dropped / "dropped.csv")
    for row in plan:
        name = f"{row['case']}-{row['dropped']}.nii.gz"
        written = out / row["case"] / name
        assert written.is_file()
        real = load_volume(root / "complete" / row["case"] / name)
        synthesised = load_volume(written)
        assert synthesised.data.shape == real.data.shape == (240, 240, 155)
        np.testing.assert_allclose(synthesised.affine, real.affine)
    results = tmp_path / "results"
    assert brasyn_main(["evaluate", "--completed", str(out), "--truth", str(root / "complete"),
                        "--dropped", str(dropped / "dropped.csv"), "-o", str(results)]) == 0
    rows = read_csv(results / "brasyn_metrics.csv")
    assert len(rows) == 2 * len(plan) and {r["method"].split("_")[0] for r in rows} == {"model", "copy"}
    for row in rows:
        assert 0 < float(row["ssim_nontumour"]) <= 1 and float(row["mse_nontumour"]) > 0
    summary = read_csv(results / "brasyn_summary.csv")
    assert {(s["dropped"], s["method"]) for s in summary} >= {("all", "model"), ("all", "copy")}
    assert "| all | model |" in (results / "brasyn_summary.md").read_text()
