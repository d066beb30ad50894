import os

import torch

# Triton kernels run on the CPU through its interpreter; the variable must be set before anything
# imports triton (torch.compile's machinery does, as soon as diffae.ops is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from diffae.config import get_preset  # noqa: E402


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


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than two on a busy 2-core CI machine (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
