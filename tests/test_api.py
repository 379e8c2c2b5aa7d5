"""The package as users meet it outside the scripts: console commands and the Python API."""
from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import CONFIGS
from vq.config import REPO_ROOT, ConfigError, load_config
from vq.inference import load_translator, synthesize
from vq.nifti import load_volume

README = REPO_ROOT / "README.md"
COMMANDS = {"vq-train", "vq-test", "vq-robustness", "vq-oneshot-seg", "vq-synthesize", "vq-brasyn",
            "vq-check-dataset", "vq-make-phantom", "vq-make-lists", "vq-benchmark"}


def test_console_commands_are_installed_and_answer_help():
    found = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("vq-")}
    assert set(found) == COMMANDS
    assert all(callable(ep.load()) for ep in found.values())
    command = Path(sys.executable).parent / "vq-check-dataset"  # installed beside the environment's python
    assert command.is_file(), "run `make setup` (pip install -e .) to install the commands"
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--config" in done.stdout


def test_python_api_synthesises_a_missing_sequence_from_arrays(trained_run, phantom_dir):
    """The notebook path: a trained model, two arrays in, the fused prediction out under the names asked for."""
    overrides, run_dir = trained_run
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", overrides)
    translator = load_translator(cfg, run_dir / "ckpt_best.pth", device="cpu", batch_size=8, precision="none")
    assert translator.batch_size == 8 and translator.amp is None
    # the training data's brain range per sequence, for z-scored inputs (vq.dataloader.preprocess.prepare)
    reference = translator.intensity_reference
    assert set(reference) <= {"t1", "t1ce", "t2", "flair"} and len(reference) >= 2
    assert all(-1 < lo < hi <= 1 for lo, hi in reference.values())
    name = "BraTS2021_00000"
    t1, t2 = (load_volume(phantom_dir / name / f"{name}_{s}.nii.gz").data[:, :, 70:74] for s in ("t1", "t2"))
    out = synthesize(translator, {"t1": t1, "t2": t2}, ["flair", "t1ce"])
    assert list(out) == ["flair", "t1ce"]
    for volume in out.values():
        assert volume.shape == t1.shape and volume.dtype == np.float32
        assert -1 <= volume.min() and volume.max() <= 1
    alone = synthesize(translator, {"t1": t1}, ["flair"])["flair"]
    assert not np.allclose(alone, out["flair"])  # the second source changes the fused latent
    by_index = synthesize(translator, {"t1": t1}, [3])  # indices in, indices out
    assert list(by_index) == [3] and np.array_equal(by_index[3], alone)


def test_load_translator_names_a_precision_it_does_not_know(trained_run):
    overrides, run_dir = trained_run
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", overrides)
    with pytest.raises(ConfigError, match="precision 'fp64'"):
        load_translator(cfg, run_dir / "ckpt_best.pth", precision="fp64")


def test_the_readme_python_example_runs_as_written(trained_run, phantom_dir, tmp_path, monkeypatch):
    """The README's Python block, executed verbatim in a folder laid out as a repository after `make demo`:
    the demo config (here with the tiny test model), the demo checkpoint and the phantom."""
    overrides, run_dir = trained_run
    block = README.read_text().split("```python\n")[1].split("```")[0]
    config = tmp_path / "publications" / "config" / "vq" / "demo_phantom_cpu.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(load_config(CONFIGS / "demo_phantom_cpu.yaml", overrides).to_dict()))
    checkpoint = tmp_path / "outputs" / "ckpt" / "demo" / "phantom" / "2d" / "ckpt_best.pth"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(run_dir / "ckpt_best.pth", checkpoint)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "phantom").symlink_to(phantom_dir)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert list(namespace["missing"]) == ["flair"]
    assert namespace["missing"]["flair"].shape == namespace["t1"].shape
