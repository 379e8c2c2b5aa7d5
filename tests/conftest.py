"""Shared fixtures: a small phantom dataset in BraTS layout and a tiny trained run, made once per session."""
from __future__ import annotations

import pytest
import torch

from vq.config import REPO_ROOT

CONFIGS = REPO_ROOT / "publications" / "config" / "vq"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Six phantom subjects (seed 0) with train/valid/test lists (3/1/2) in a temporary folder."""
    from vq.tools.make_phantom_brats import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantom"), n=6, seed=0)


def tiny_overrides(phantom_dir, work_dir) -> list[str]:
    """--set items that shrink any config to a model and data small enough for a test."""
    return [f"data.root={phantom_dir}", f"data.cache_dir={work_dir}/cache", f"out_dir={work_dir}/run",
            "model.base_channels=4", "model.n_res=1", "model.n_kernels=2", "model.n_embed=16",
            "data.crop=64", "data.n_slices=16", "data.slices_per_subject=2", "data.num_workers=0",
            "train.batch_size=2", "train.val_slices=2", "train.log_every=1", "test.batch_size=8",
            "train.lambda_per=0"]


@pytest.fixture(scope="session")
def trained_run(phantom_dir, tmp_path_factory):
    """A tiny VQ-Seq2Seq trained for 6 steps with the full recipe; returns (config overrides, run folder)."""
    from vq.train.train_brats_vq_seq2seq_2d import main

    work = tmp_path_factory.mktemp("trained")
    overrides = tiny_overrides(phantom_dir, work) + ["train.pretrain_epochs_contrast=-1",
                                                     "train.pretrain_epochs_rand=0"]
    code = main(["-d", "cpu", "-c", str(CONFIGS / "demo_phantom_cpu.yaml"), "--set", *overrides,
                 "train.max_steps=6"])
    assert code == 0
    return overrides, work / "run"


@pytest.fixture(scope="session")
def vgg_weights_file(tmp_path_factory):
    """A VGG19 `features` state dict with random weights, in torchvision's key layout."""
    from torchvision.models import vgg19

    path = tmp_path_factory.mktemp("weights") / "vgg19-random.pth"
    torch.manual_seed(0)
    state = {k: v for k, v in vgg19().state_dict().items() if k.startswith("features.")}
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def alexnet_weights_file(tmp_path_factory):
    """An AlexNet state dict with random weights, in torchvision's key layout (for LPIPS)."""
    from torchvision.models import alexnet

    path = tmp_path_factory.mktemp("weights") / "alexnet-random.pth"
    torch.manual_seed(0)
    torch.save(alexnet().state_dict(), path)
    return path
