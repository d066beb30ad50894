"""Samplers against the exact probability-flow map of Gaussian data, where the ideal denoiser is known."""
import math

import pytest
import torch

from diffae.config import DiffusionConfig
from diffae.diffusion import samplers
from diffae.diffusion.objectives import loss_weight, target
from diffae.diffusion.process import Process
from diffae.errors import ConfigError

MU, S = 0.3, 0.5  # data ~ N(MU, S^2) per pixel


def oracle(process: Process, pred: str):
    """The Bayes-optimal network output for Gaussian data."""
    def denoise(x, t):
        a, s = process.alpha_sigma_at(t)
        x0 = MU + a * S * S / (a * a * S * S + s * s) * (x - a * MU)
        if pred == "x0":
            return x0
        eps = s * (x - a * MU) / (a * a * S * S + s * s)  # = (x - a x0) / s, finite at s = 0
        return eps if pred == "eps" else a * eps - s * x0
    return denoise


def exact_map(process: Process, x_T: torch.Tensor, t_start: float = 1.0) -> torch.Tensor:
    a, s = process.alpha_sigma_at(t_start)
    return MU + S * (x_T - a * MU) / math.sqrt(a * a * S * S + s * s)


def start(process: Process, n=4096, seed=0):
    a, s = process.alpha_sigma_at(1.0)
    g = torch.Generator().manual_seed(seed)
    return a * MU + math.sqrt(a * a * S * S + s * s) * torch.randn(n, generator=g)


@pytest.mark.parametrize("kind", ["vp-cosine", "vp-linear", "ve"])
def test_process_is_monotone_and_noiseless_at_zero(kind):
    p = Process(DiffusionConfig(process=kind))
    t = torch.linspace(0, 1, 101)
    a, s = p.alpha_sigma(t)
    snr = a / s.clamp_min(1e-12)
    assert (snr[1:] < snr[:-1]).all()
    if kind != "ve":
        assert abs(float(a[0]) - 1) < 1e-6 and float(s[0]) < 1e-3
        assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-5)
    else:
        assert abs(float(s[0]) - 0.01) < 1e-6 and abs(float(s[-1]) - 50) < 1e-3


@pytest.mark.parametrize("kind", ["vp-cosine", "ve"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp2m"])
def test_deterministic_samplers_follow_the_exact_flow(kind, sampler):
    p = Process(DiffusionConfig(process=kind))
    x_T = start(p)
    # first-order samplers converge slowly (error ~0.03 at 100 steps, ~0.008 at 400)
    out = samplers.sample(oracle(p, "eps"), x_T, p, 400, sampler, "eps", clip=0.0)
    err = (out - exact_map(p, x_T)).abs().max().item()
    assert err < 1.5e-2, err


def test_second_order_samplers_beat_euler():
    p = Process(DiffusionConfig(process="vp-cosine"))
    x_T = start(p)
    exact = exact_map(p, x_T)
    err = {s: (samplers.sample(oracle(p, "eps"), x_T, p, 32, s, "eps", clip=0.0) - exact).abs().mean().item()
           for s in ("euler", "heun", "dpmpp2m")}
    assert err["dpmpp2m"] < err["euler"] and err["heun"] < err["euler"], err


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_prediction_types_agree(pred):
    p = Process(DiffusionConfig(process="vp-cosine"))
    x_T = start(p, n=256)
    ref = samplers.sample(oracle(p, "eps"), x_T, p, 20, "ddim", "eps", clip=0.0)
    out = samplers.sample(oracle(p, pred), x_T, p, 20, "ddim", pred, clip=0.0)
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["vp-cosine", "ve"])
def test_ddpm_matches_the_data_distribution(kind):
    p = Process(DiffusionConfig(process=kind))
    out = samplers.sample(oracle(p, "eps"), start(p, n=20000), p, 200, "ddpm", "eps", clip=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.02


def test_ddim_inversion_round_trips():
    p = Process(DiffusionConfig(process="vp-cosine"))
    x0 = MU + S * torch.randn(512, generator=torch.Generator().manual_seed(3))
    errors = []
    for steps in (100, 400):  # first order: the round-trip error shrinks ~4x with 4x the steps
        x_T = samplers.ddim_invert(oracle(p, "eps"), x0, p, steps, "eps")
        back = samplers.sample(oracle(p, "eps"), x_T, p, steps, "ddim", "eps", clip=0.0)
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 2e-2 and errors[1] < errors[0] / 3, errors


def test_unknown_sampler_and_eta_misuse():
    p = Process(DiffusionConfig())
    with pytest.raises(ConfigError, match="unknown sampler 'plms'"):
        samplers.sample(oracle(p, "eps"), start(p, 4), p, 5, "plms")
    with pytest.raises(ConfigError, match="eta applies to the ddim sampler"):
        samplers.sample(oracle(p, "eps"), start(p, 4), p, 5, "heun", eta=0.5)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        samplers.schedule(p, 0)


def test_targets_and_min_snr_weights():
    a, s = torch.tensor([0.6]), torch.tensor([0.8])
    x0, eps = torch.tensor([1.0]), torch.tensor([-0.5])
    assert torch.allclose(target("v", x0, eps, a, s), a * eps - s * x0)
    w = loss_weight("eps", "min-snr", a, s, gamma=0.1)
    assert torch.allclose(w, 0.1 / (a / s) ** 2)


def test_restricted_noise_range_is_respected():
    p = Process(DiffusionConfig(t_min=0.2, t_max=0.4))
    t = p.sample_t(10000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 0.2 and t.max() <= 0.4 and t.std() > 0.05
    ve = Process(DiffusionConfig(process="ve", prediction="score", t_sampling="uniform-sigma"))
    sig = ve.alpha_sigma(ve.sample_t(20000, "cpu", torch.Generator().manual_seed(0)))[1]
    assert abs(sig.mean().item() - 25.0) < 0.6  # uniform on [0.01, 50]
