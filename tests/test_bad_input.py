"""Bad input ends in a one-line error naming the file, subject or key, and a non-zero exit; never silent."""
from __future__ import annotations

import csv
import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import CONFIGS
from vq.cli import load_trained_model
from vq.config import ConfigError, load_config
from vq.dataloader.lists import read_list
from vq.sequences import SEQUENCES, train_pair
from vq.test.test_brats_vq_2d_metrics import main as evaluate_main
from vq.test.test_brats_vq_2d_metrics import parse_args as evaluate_args
from vq.tools.synthesize import parse_args as synthesize_args
from vq.train.train_brats_vq_seq2seq_2d import main as train_main
from vq.train.train_brats_vq_seq2seq_2d import parse_args as train_args


def copy_dataset(src, dst):
    """Subject folders as links to the originals' files (fast), lists copied; breakage replaces a link."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_dir():
            (dst / item.name).mkdir(parents=True)
            for f in item.iterdir():
                (dst / item.name / f.name).symlink_to(f)
        else:
            shutil.copy(item, dst / item.name)
    return dst


def write_like(path, data):
    ref = nib.load(str(path))
    path.unlink()
    nib.save(nib.Nifti1Image(data, ref.affine), str(path))


def break_file(path, how):
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        blob = path.read_bytes()[:2000]
        path.unlink()
        path.write_bytes(blob)
    elif how == "not_nifti":
        path.unlink()
        path.write_text("this is not an image\n")
    elif how == "shape":
        write_like(path, np.ones((200, 200, 155), np.float32))
    elif how == "zeros":
        write_like(path, np.zeros((240, 240, 155), np.float32))
    elif how == "nan":
        data = np.asarray(nib.load(str(path)).dataobj, np.float32)
        data[120, 120, 70] = np.nan
        write_like(path, data)


@pytest.fixture
def broken(phantom_dir, tmp_path):
    return copy_dataset(phantom_dir, tmp_path / "data")


def eval_args(trained_run, root, out):
    overrides, run_dir = trained_run
    return ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "-l", str(run_dir / "ckpt_best.pth"),
            "-o", str(out), "--set", *overrides, f"data.root={root}", f"data.cache_dir={out}/cache"]


@pytest.mark.parametrize("how", ["missing", "truncated", "not_nifti", "shape", "zeros", "nan"])
def test_a_broken_test_subject_is_an_error_naming_it(how, broken, trained_run, tmp_path, caplog):
    name, _ = read_list(broken / "test.csv")[0]
    path = broken / name / f"{name}_t2.nii.gz"
    break_file(path, how)
    assert evaluate_main(eval_args(trained_run, broken, tmp_path / "out")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and name in errors[-1] and "\n" not in errors[-1]
    if how != "shape":
        assert path.name in errors[-1]


@pytest.mark.parametrize("suffix", ["seg", "tissue"])
def test_a_broken_label_map_of_the_last_subject_stops_evaluation_before_any_prediction(
        suffix, broken, trained_run, tmp_path, caplog):
    """The label maps are read inside the subject loop; they are checked before its first prediction."""
    name, _ = read_list(broken / "test.csv")[-1]
    path = broken / name / f"{name}_{suffix}.nii.gz"
    break_file(path, "truncated")
    out = tmp_path / "out"
    assert evaluate_main(eval_args(trained_run, broken, out)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and path.name in errors[-1] and "\n" not in errors[-1]
    assert not (out / "figures").exists() and not (out / "nifti").exists()  # nothing predicted, nothing lost


def test_test_subjects_need_no_segmentation(broken, trained_run, tmp_path):
    # users' own test sets often have no seg file; the script reads only the sequences
    names = [name for name, _ in read_list(broken / "test.csv")]
    for name in names:
        (broken / name / f"{name}_seg.nii.gz").unlink()
    out = tmp_path / "out"
    assert evaluate_main(eval_args(trained_run, broken, out)) == 0
    assert sorted(p.name for p in (out / "nifti").iterdir()) == sorted(names)


@pytest.mark.parametrize("paths, message", [
    ([["t1", "t1ce", "t2"], ["t1", "flair", "t2"]], "both go from t1 to t2"),
    ([["t1", "t1gd", "t2"]], "unknown sequence 't1gd'"),
    ([["t1", "t2"]], "is not a multi-step path"),
])
def test_ambiguous_or_unknown_multi_step_paths_are_config_errors(paths, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo_phantom_cpu.yaml", [f"test.multi_step={json.dumps(paths)}"])


@pytest.mark.parametrize("n", ["1", "-3"])
def test_synthesis_needs_two_samples_for_a_std(n, capsys):
    with pytest.raises(SystemExit) as exit_:
        synthesize_args(["-c", "c.yaml", "-l", "ckpt.pth", "-o", "out", "--src", "t1", "t1.nii.gz",
                         "--tgt", "t2", "--samples", n])
    assert exit_.value.code == 2 and "--samples must be 0" in capsys.readouterr().err


def broken_train_args(trained_run, root, work, *extra):
    overrides, _ = trained_run
    return ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *overrides, f"data.root={root}",
            f"data.cache_dir={work}/cache", f"out_dir={work}/run", "train.max_steps=1", *extra]


def break_training_subject(broken, how):
    """Break one file a training subject trains on (or list a subject that does not exist)."""
    name, avail = read_list(broken / "train.csv")[0]
    if how == "unlisted":
        with open(broken / "train.csv", "a") as f:
            f.write("BraTS2021_99999,5\n")
        return "BraTS2021_99999", "BraTS2021_99999"
    path = broken / name / f"{name}_{SEQUENCES[train_pair(avail)[0]]}.nii.gz"
    break_file(path, how)
    return name, path.name if how != "shape" else "differ in shape"


BROKEN = ["missing", "truncated", "not_nifti", "shape", "zeros", "nan", "unlisted"]


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_training_subject_stops_the_run_before_it_starts(how, broken, trained_run, tmp_path, caplog, capsys):
    name, what = break_training_subject(broken, how)
    assert train_main(broken_train_args(trained_run, broken, tmp_path)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    n_checked = len(read_list(broken / "train.csv")) + len(read_list(broken / "valid.csv"))
    assert f"1 of {n_checked} subjects unusable" in errors[0] and name in errors[0] and what in errors[0]
    assert "data.skip_bad=true" in errors[0] and "Traceback" not in capsys.readouterr().err
    report = tmp_path / "run" / "bad_subjects.csv"
    assert str(report) in errors[0] and name in report.read_text()
    assert not (tmp_path / "run" / "ckpt_last.pth").exists() and not (tmp_path / "run" / "log.csv").exists()


@pytest.mark.parametrize("how", ["truncated", "unlisted"])
def test_skip_bad_trains_without_them_and_says_so(how, broken, trained_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    name, _ = break_training_subject(broken, how)
    assert train_main(broken_train_args(trained_run, broken, tmp_path, "data.skip_bad=true")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("training without them: 1 of" in w and name in w for w in warnings)
    n_train = len(read_list(broken / "train.csv")) - 1
    assert any(f"; {n_train} train / 1 valid subjects" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", BROKEN)
def test_the_check_command_reports_the_same_cases(how, broken, trained_run, tmp_path, capsys):
    from vq.tools.check_dataset import main as check_main

    overrides, _ = trained_run
    name, what = break_training_subject(broken, how)
    report = tmp_path / "report.csv"
    code = check_main(["-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "-o", str(report), "--set", *overrides,
                       f"data.root={broken}", f"data.cache_dir={tmp_path}/cache"])
    out = capsys.readouterr().out
    n = {lst: len(read_list(broken / f"{lst}.csv")) for lst in ("train", "valid", "test")}
    assert code == 1 and f"| train | {n['train']} | {n['train'] - 1} | 1 |" in out
    assert f"| test | {n['test']} | {n['test']} | 0 |" in out
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [r for r in rows if r["status"] == "bad"]
    assert len(rows) == sum(n.values()) and [(r["list"], r["subject"]) for r in bad] == [("train", name)]
    assert what in bad[0]["reason"]


def test_the_check_command_passes_a_good_dataset(phantom_dir, trained_run, tmp_path, capsys):
    from vq.tools.check_dataset import main as check_main

    overrides, _ = trained_run
    assert check_main(["-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *overrides,
                       f"data.cache_dir={tmp_path}/cache"]) == 0
    assert "all 6 subjects usable" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [("BraTS2021_99999,5", "BraTS2021_99999"), ("{name},15", "not in 1..14"),
                                           ("{name},3", "listed twice")])
def test_a_bad_data_list_is_an_error_with_file_and_line(line, message, broken, trained_run, tmp_path, caplog):
    name, _ = read_list(broken / "test.csv")[0]
    with open(broken / "test.csv", "a") as f:
        f.write(line.format(name=name) + "\n")
    assert evaluate_main(eval_args(trained_run, broken, tmp_path / "out")) == 2
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert message in error


def test_existing_results_are_not_overwritten(trained_run, phantom_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result_metrics.csv").write_text("name,src,tgt\n")
    assert evaluate_main(eval_args(trained_run, phantom_dir, out)) == 2
    assert (out / "result_metrics.csv").read_text() == "name,src,tgt\n"
    assert "--overwrite" in caplog.text


def test_a_checkpoint_of_another_architecture_is_refused_naming_keys(trained_run, phantom_dir, tmp_path, caplog):
    args = eval_args(trained_run, phantom_dir, tmp_path / "out") + ["model.base_channels=8"]
    assert evaluate_main(args) == 2
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "does not match the model" in error and "encoder." in error


def test_a_config_that_normalises_differently_from_training_warns(trained_run, tmp_path, caplog):
    overrides, run_dir = trained_run
    state = torch.load(run_dir / "ckpt_best.pth", weights_only=True)
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", overrides)
    load_trained_model(cfg, str(run_dir / "ckpt_best.pth"), torch.device("cpu"))
    assert "data.percentile" not in caplog.text  # the training config: no warning
    state["config"]["data"]["percentile"] = 98.0
    torch.save(state, tmp_path / "ckpt.pth")
    load_trained_model(cfg, str(tmp_path / "ckpt.pth"), torch.device("cpu"))
    assert "trained with data.percentile=98.0 but this config normalises with 99.0" in caplog.text


MODEL_ARGS = ["-c", "c.yaml", "-l", "ckpt.pth", "-o", "out"]


@pytest.mark.parametrize("parse, required", [
    (train_args, ["-c", "c.yaml"]), (evaluate_args, MODEL_ARGS),
    (synthesize_args, MODEL_ARGS + ["--src", "t1", "t1.nii.gz", "--tgt", "t2"])])
def test_repeated_set_flags_add_up(parse, required):
    # argparse keeps only the last of repeated nargs="*" flags unless told to extend
    args = parse(required + ["--set", "train.batch_size=3", "--set", "train.epochs=7", "seed=1"])
    assert args.set == ["train.batch_size=3", "train.epochs=7", "seed=1"]


def test_a_mistyped_config_value_names_the_key(caplog):
    code = train_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", "train.batch_size=four"])
    assert code == 2
    assert "train.batch_size: expected an integer" in caplog.text
