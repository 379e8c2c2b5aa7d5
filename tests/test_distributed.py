"""torchrun with 2 CPU processes (gloo): training runs, rank 0 alone writes, replicas stay identical."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, tiny_overrides
from vq.config import REPO_ROOT


@pytest.mark.long
def test_two_process_gloo_training(phantom_dir, tmp_path):
    script = REPO_ROOT / "publications/src/vq/train/train_brats_vq_seq2seq_2d.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set",
           *tiny_overrides(phantom_dir, tmp_path), "train.max_steps=3", "train.pretrain_epochs_contrast=-1",
           "train.pretrain_epochs_rand=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "model weights identical on all 2 ranks: True" in output
    run = tmp_path / "run"
    with open(run / "log.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]
    assert steps == [1, 2, 3]  # one writer: no duplicated rows
    assert sorted(p.name for p in run.glob("ckpt_*.pth")) == ["ckpt_best.pth", "ckpt_last.pth"]
    assert not list(run.glob(".*.tmp"))
