"""The FLOP count behind MFU (diffae.engine.flops) against torch.utils.flop_counter.

Both count matrix products only (linear, conv, the attention's two batched products), so the
forward counts agree exactly; neither counts elementwise work (norms, softmax, activations,
modulation, the loss).  The training count is 3 x forward; FlopCounterMode counts the backward
actually run, which skips the input gradients of the first layers (images and timestep features
need none), so there the count may exceed it by a fraction of a percent.

Models are built on the meta device (shapes only: no memory, no time) and SDPA is held to its
math backend, whose batched products FlopCounterMode sees (it has no formula for the fused CPU
attention kernel).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffae.config import get_preset
from diffae.engine import flops
from diffae.nn.autoencoder import DiffusionAutoencoder


def _counted(cfg, backward: bool, batch: int = 2) -> float:
    with torch.device("meta"):
        model = DiffusionAutoencoder(cfg)
    if not backward:
        model.requires_grad_(False)
    m = cfg.model
    x = torch.randn(batch, m.channels, m.img_size, m.img_size, device="meta")
    t = torch.rand(batch, device="meta")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        latent = model.encoder(x, t if model.encoder.time_dependent else None, sample=True)
        out = model.denoiser(x, t, latent.z)
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("name, extra", [
    ("dae-tiny", []),
    ("dae-b", []),
    ("dae-b", ["model.img_size=32", "model.channels=3"]),  # the yardstick's setting
    ("dmz", []),     # cross-attention: extra key/value tokens
    ("diffae", []),  # z as a per-block scale
    ("vdrl", []),    # time-dependent encoder, Gaussian code
])
def test_forward_count_matches_flop_counter(name, extra):
    cfg = get_preset(name).override(extra)
    assert flops.forward_flops_per_image(cfg) == pytest.approx(_counted(cfg, backward=False), rel=1e-3)


@pytest.mark.parametrize("name", ["dae-tiny", "dae-b"])
def test_training_count_is_three_forwards(name):
    cfg = get_preset(name)
    counted = _counted(cfg, backward=True)
    assert flops.train_flops_per_image(cfg) == 3 * flops.forward_flops_per_image(cfg)
    assert counted <= flops.train_flops_per_image(cfg) <= 1.01 * counted


def test_dae_b_per_image_is_about_150_gflop_at_32px():
    # DiT-B/2 on 256 tokens is ~3 x 2 x 23 GMAC per image; a guard against a dropped term
    cfg = get_preset("dae-b").override(["model.img_size=32", "model.channels=3"])
    assert 140e9 < flops.train_flops_per_image(cfg) < 150e9


def test_mfu_and_cpu_peak():
    assert flops.measure_matmul_flops(torch.device("cpu")) is None  # MFU is a CUDA figure
    assert flops.mfu(1e9, 100.0, None) is None
    assert flops.mfu(1e9, 100.0, 1e12, devices=2) == pytest.approx(0.05)
