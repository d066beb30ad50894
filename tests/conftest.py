import os

import pytest
import torch

from diffae.config import get_preset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def micro_cfg():
    """A model small enough for many training steps in a CPU test."""
    cfg = get_preset("dae-tiny")
    return cfg.override(["model.dim=32", "model.depth=2", "model.heads=2", "model.patch=4",
                         "encoder.dim=32", "encoder.depth=1", "encoder.heads=2", "encoder.patch=7",
                         "encoder.z_dim=8", "train.batch_size=16", "train.log_every=5",
                         "train.ckpt_every=1000", "train.warmup_steps=5", "train.lr=2e-3",
                         "train.dataset=synthetic"])


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
