"""The latent prior must reproduce the spread of the codes it was trained on: unconditional samples
are only as good as the z they are decoded from."""
import pytest
import torch

from diffae.config import get_preset
from diffae.engine.pipeline import Pipeline
from diffae.nn.autoencoder import DiffusionAutoencoder
from diffae.nn.latent_prior import LatentPrior


def _codes(dim: int, n: int = 4096) -> torch.Tensor:
    """Two well-separated clusters with unequal spreads, already standardised per dimension."""
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(dim, generator=g)
    side = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1.0, -1.0)
    z = side * centre + 0.3 * torch.randn(n, dim, generator=g) * torch.linspace(0.5, 1.5, dim)
    return (z - z.mean(0)) / z.std(0)


def _trained_prior(prediction: str, zs: torch.Tensor, steps: int = 400) -> LatentPrior:
    torch.manual_seed(0)
    prior = LatentPrior(zs.shape[1], 128, 3, prediction)
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = prior.loss(zs[torch.randint(0, zs.shape[0], (256,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prior.eval().requires_grad_(False)


@pytest.mark.parametrize("prediction", ["v"])
def test_prior_samples_match_the_spread_of_the_codes(prediction):
    cfg = get_preset("dae-tiny")
    zs = _codes(cfg.encoder.z_dim)
    pipe = Pipeline(DiffusionAutoencoder(cfg), _trained_prior(prediction, zs))
    for steps in (10, 50):
        z = pipe.sample_latents(2048, steps=steps, seed=1)
        ratio = z.std(0) / zs.std(0)
        # an eps-predicting prior fails this (x0 = (z_t - sigma * eps) / alpha, alpha(1) = 0.003): on
        # dae-tiny's Fashion-MNIST codes its samples had 7x (50 steps) to 16x (10 steps) their spread
        assert ((ratio > 0.7) & (ratio < 1.3)).all(), (steps, ratio)
        assert z.abs().max() < 8, (steps, z.abs().max())
        # both clusters are found: the sign of the projection on the first code's direction splits them
        side = (z @ zs[0]).sign()
        assert 0.3 < (side > 0).float().mean() < 0.7


def test_prior_config_round_trips_and_rejects_unknown_predictions():
    prior = LatentPrior(8, 32, 2)
    again = LatentPrior(**prior.config())
    assert again.config() == prior.config() and again.prediction == "v"
    with pytest.raises(ValueError, match="prediction"):
        LatentPrior(8, 32, 2, "x0")
