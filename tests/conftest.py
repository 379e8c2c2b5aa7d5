"""Shared fixtures: a small phantom dataset in BraTS layout, generated once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Six phantom subjects (seed 0) with train/valid/test lists (3/1/2) in a temporary folder."""
    from vq.tools.make_phantom_brats import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantom"), n=6, seed=0)
