"""The package as users meet it outside the scripts: console commands and the Python API."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import torch

from conftest import CONFIGS
from vq.cli import load_trained_model
from vq.config import load_config
from vq.inference import Translator, synthesize
from vq.nifti import load_volume

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
    """The README's notebook path: a trained model, two arrays in, the fused prediction out."""
    overrides, run_dir = trained_run
    cfg = load_config(CONFIGS / "demo_phantom_cpu.yaml", overrides)
    model = load_trained_model(cfg, str(run_dir / "ckpt_best.pth"), torch.device("cpu"))
    name = "BraTS2021_00000"
    t1, t2 = (load_volume(phantom_dir / name / f"{name}_{s}.nii.gz").data[:, :, 70:74] for s in ("t1", "t2"))
    out = synthesize(Translator(model, "cpu", None, 8), {"t1": t1, "t2": t2}, ["flair", "t1ce"])
    assert set(out) == {3, 1}
    for volume in out.values():
        assert volume.shape == t1.shape and volume.dtype == np.float32
        assert -1 <= volume.min() and volume.max() <= 1
    alone = synthesize(Translator(model, "cpu", None, 8), {"t1": t1}, ["flair"])[3]
    assert not np.allclose(alone, out[3])  # the second source changes the fused latent
