"""Latent heads: what kind of code z the encoder produces.

Each head maps pooled encoder features (B, F) to a Latent: `z` feeds the denoiser, `embedding`
is the deterministic representation used downstream (probes, kNN), `reg` the head's penalty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Latent:
    z: torch.Tensor          # (B, z_dim), what the denoiser sees
    embedding: torch.Tensor  # (B, z_dim), deterministic code for downstream use
    reg: torch.Tensor        # scalar penalty (already weighted)


class DeterministicHead(nn.Module):
    """z = W h, with an optional L1 penalty (DRL's deterministic code)."""

    def __init__(self, features: int, z_dim: int, l1_weight: float = 0.0):
        super().__init__()
        self.proj, self.l1_weight = nn.Linear(features, z_dim), l1_weight

    def draw_noise(self, n: int, device=None, generator=None) -> None:
        return None  # nothing to sample

    def forward(self, h: torch.Tensor, sample: bool = False, noise: torch.Tensor | None = None) -> Latent:
        z = self.proj(h)
        reg = self.l1_weight * z.float().abs().sum(-1).mean() if self.l1_weight else z.new_zeros(())
        return Latent(z, z, reg)

    def prior_sample(self, n: int, z_dim: int, generator=None, device=None) -> torch.Tensor:
        raise NotImplementedError("a deterministic code has no prior: train a latent prior")


class GaussianHead(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))), KL to N(0, I) (VDRL); reparameterised when sampling."""

    def __init__(self, features: int, z_dim: int, kl_weight: float = 0.0):
        super().__init__()
        self.proj, self.kl_weight, self.z_dim = nn.Linear(features, 2 * z_dim), kl_weight, z_dim

    def draw_noise(self, n: int, device=None, generator=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=device, generator=generator)  # (n, z_dim) N(0, I)

    def forward(self, h: torch.Tensor, sample: bool = False, noise: torch.Tensor | None = None) -> Latent:
        """noise: the reparameterisation's N(0, I) draw (B, z_dim) when sampling (drawn here if None)."""
        mu, logvar = self.proj(h).float().chunk(2, -1)
        logvar = logvar.clamp(-30.0, 20.0)
        if sample:
            eps = torch.randn_like(mu) if noise is None else noise
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        return Latent(z, mu, self.kl_weight * kl)

    def prior_sample(self, n, z_dim, generator=None, device=None):
        return torch.randn(n, z_dim, generator=generator, device=device)


class BernoulliHead(nn.Module):
    """Binary code z in {0, 1}^d: sampled bits forward, sigmoid gradient backward (straight-through).
    At evaluation z is the thresholded probability; the embedding is the probability itself."""

    def __init__(self, features: int, z_dim: int):
        super().__init__()
        self.proj, self.z_dim = nn.Linear(features, z_dim), z_dim

    def draw_noise(self, n: int, device=None, generator=None) -> torch.Tensor:
        return torch.rand(n, self.z_dim, device=device, generator=generator)  # (n, z_dim) U(0, 1)

    def forward(self, h: torch.Tensor, sample: bool = False, noise: torch.Tensor | None = None) -> Latent:
        """noise: uniform draws (B, z_dim) when sampling; bit i is 1 where noise < p_i."""
        p = torch.sigmoid(self.proj(h).float())
        if sample:
            bits = ((torch.rand_like(p) if noise is None else noise) < p).float()
        else:
            bits = (p > 0.5).float()
        z = bits + p - p.detach()
        return Latent(z, p, p.new_zeros(()))

    def prior_sample(self, n, z_dim, generator=None, device=None):
        return torch.bernoulli(torch.full((n, z_dim), 0.5, device=device), generator=generator)


def make_latent_head(kind: str, features: int, z_dim: int, l1_weight: float, kl_weight: float) -> nn.Module:
    if kind == "deterministic":
        return DeterministicHead(features, z_dim, l1_weight)
    if kind == "gaussian":
        return GaussianHead(features, z_dim, kl_weight)
    return BernoulliHead(features, z_dim)
