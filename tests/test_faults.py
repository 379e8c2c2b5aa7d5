"""Nothing is lost when a file is swapped under the cache, the disk fills, a process dies mid-save, or the
ranks of a torchrun job wait on a cold cache."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import CONFIGS, tiny_overrides
from vq import checkpoint as checkpoint_module
from vq.checkpoint import read_checkpoint, save_checkpoint
from vq.config import DataConfig
from vq.dataloader.brats import SliceCache
from vq.dataloader.preprocess import central_slices, normalize
from vq.nifti import load_volume
from vq.train.train_brats_vq_seq2seq_2d import main as train_main


def test_the_cache_sees_a_file_replaced_with_the_same_size_and_time(phantom_dir, tmp_path, caplog):
    """`cp -p` of another subject's volume over a subject's uncompressed .nii: same size, same mtime,
    other content; the cache rebuilds the entry from the new content."""
    names = sorted(p.name for p in phantom_dir.iterdir() if p.is_dir())[:2]
    root = tmp_path / "data"
    for name in names:
        (root / name).mkdir(parents=True)
        for seq in ("t1", "t1ce", "t2", "flair"):
            image = nib.load(str(phantom_dir / name / f"{name}_{seq}.nii.gz"))
            nib.save(image, str(root / name / f"{name}_{seq}.nii"))  # uncompressed: same size for any content
    cache = SliceCache(tmp_path / "cache", root, DataConfig(n_slices=8))
    cache.ensure({names[0]: ["t1"]})
    target, other = root / names[0] / f"{names[0]}_t1.nii", root / names[1] / f"{names[1]}_t1.nii"
    stat = target.stat()
    shutil.copyfile(other, target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    caplog.set_level("INFO")
    cache.ensure({names[0]: ["t1"]})
    assert "replaced (same size and time, other content)" in caplog.text
    data = load_volume(other).data  # RAS+, as the cache reads it
    expected = normalize(data)[:, :, central_slices(data.shape[2], 8)].transpose(2, 0, 1)
    np.testing.assert_allclose(np.asarray(cache.volume(names[0], "t1"), np.float32), expected, atol=5e-4)


def tiny_run(phantom_dir, work, *extra):
    return ["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *tiny_overrides(phantom_dir, work),
            *extra]


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_the_run_resumable(phantom_dir, tmp_path,
                                                                                   monkeypatch, caplog):
    run = tmp_path / "run"
    assert train_main(tiny_run(phantom_dir, tmp_path, "train.max_steps=3")) == 0
    before = read_checkpoint(run / "ckpt_last.pth")
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # half a checkpoint, then ENOSPC
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "ckpt_last.pth"))

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    assert train_main(["-d", "cpu", "--resume", str(run), "--set", "train.max_steps=6"]) == 2
    assert "no space left on device" in caplog.text and "--resume" in caplog.text
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    kept = read_checkpoint(run / "ckpt_last.pth")
    assert kept["step"] == before["step"] == 3
    assert all(torch.equal(kept["model"][k], v) for k, v in before["model"].items())
    assert not list(run.glob(".*.tmp"))
    assert train_main(["-d", "cpu", "--resume", str(run), "--set", "train.max_steps=6"]) == 0
    assert read_checkpoint(run / "ckpt_last.pth")["step"] == 6


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing a 200 MB checkpoint: the file under the final name is the
    previous complete one (only a temporary file is left behind)."""
    path = tmp_path / "ckpt_last.pth"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 1}, path)
    script = textwrap.dedent(f"""
        import torch
        from vq.checkpoint import save_checkpoint
        state = {{"model": {{"w": torch.randn(50_000_000)}}, "step": 2}}
        while True:
            save_checkpoint(state, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".*.tmp")):  # a save is under way
            time.sleep(0.01)
        assert list(tmp_path.glob(".*.tmp")), "the child never started writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    state = read_checkpoint(path)  # complete: either the first or a finished second checkpoint
    assert state["step"] in (1, 2) and state["model"]["w"].numel() in (3, 50_000_000)


def test_a_full_disk_while_writing_results_leaves_no_complete_looking_file(trained_run, tmp_path, monkeypatch,
                                                                           caplog, alexnet_weights_file):
    from vq import files
    from vq.test.test_brats_vq_2d_metrics import main as evaluate_main

    overrides, run_dir = trained_run
    real = files.os.replace

    def full_at_results(src, dst):
        if str(dst).endswith("result_metrics.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full_at_results)
    out = tmp_path / "out"
    assert evaluate_main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "-l",
                          str(run_dir / "ckpt_best.pth"), "-o", str(out), "--lpips-weights",
                          str(alexnet_weights_file), "--set", *overrides,
                          "test.save_nifti=false"]) == 2
    assert "no space left on device" in caplog.text
    assert not (out / "result_metrics.csv").exists() and not list(out.glob(".*.tmp"))


LAUNCHER = """
import sys, time
import vq.dataloader.brats as brats
brats.available_cpus = lambda: 1  # build in this process, so the slow build below applies
build = brats._build
def slow_build(job):
    time.sleep({delay})
    return build(job)
brats._build = slow_build
from vq.train.train_brats_vq_seq2seq_2d import main
sys.exit(main())
"""


@pytest.mark.long
def test_torchrun_on_a_cold_cache_outlasting_the_collective_timeout(phantom_dir, tmp_path):
    """Two gloo processes, a cold cache that takes about 3x the process group's timeout to build:
    the processes take turns on the cache's lock before the process group exists, so no collective
    waits on the build."""
    launcher = tmp_path / "slow_train.py"
    launcher.write_text(LAUNCHER.format(delay=4))  # 4 subjects (train + valid) x 4 s >> 5 s timeout
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           *tiny_run(phantom_dir, tmp_path, "train.max_steps=2", "train.dist_timeout_s=5")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert time.time() - start > 16  # the build really outlasted the timeout
    assert "model weights identical on all 2 ranks: True" in output
    assert output.count("building 3 of 3 subjects") == 1  # one rank built, the other found it ready
