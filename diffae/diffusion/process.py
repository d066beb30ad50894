"""Forward processes x_t = alpha(t) x0 + sigma(t) eps on continuous time t in [0, 1].

vp-cosine  alpha_bar(t) = cos^2((t + s)/(1 + s) * pi/2) / cos^2(s/(1 + s) * pi/2), s = 0.008
vp-linear  alpha_bar(t) = exp(-(b0 t + (b1 - b0) t^2 / 2)), b0 = 0.1, b1 = 20 (DDPM's linear betas, T = 1000)
ve         alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t
alpha_bar is floored at 1e-5 so x0 stays recoverable at t = 1 (alpha >= 0.003).
"""
from __future__ import annotations

import math

import torch

from ..config import DiffusionConfig

_ALPHA_BAR_FLOOR = 1e-5
_COSINE_S = 0.008
_LINEAR_B0, _LINEAR_B1 = 0.1, 20.0
SIGMA_DATA = 0.5  # images scaled to [-1, 1] have about this standard deviation


class Process:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.kind = cfg.process

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "vp-cosine":
            f = lambda u: torch.cos((u + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2
            ab = f(t) / f(torch.zeros_like(t))
        else:
            ab = torch.exp(-(_LINEAR_B0 * t + 0.5 * (_LINEAR_B1 - _LINEAR_B0) * t * t))
        return ab.clamp(_ALPHA_BAR_FLOOR, 1.0)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) as fp32 tensors shaped like t."""
        t = t.double()
        if self.kind == "ve":
            c = self.cfg
            sigma = c.sigma_min * (c.sigma_max / c.sigma_min) ** t
            return torch.ones_like(t).float(), sigma.float()
        ab = self._alpha_bar(t)
        return ab.sqrt().float(), (1 - ab).clamp_min(0).sqrt().float()

    def alpha_sigma_at(self, t: float) -> tuple[float, float]:
        """Python floats, for sampler schedules precomputed outside the loop."""
        a, s = self.alpha_sigma(torch.tensor([t], dtype=torch.float64))
        return float(a), float(s)

    def input_scale(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Scale x_t to about unit variance before the network (VP already is; VE's sigma reaches 50)."""
        if self.kind == "ve":
            return torch.rsqrt(sigma ** 2 + SIGMA_DATA ** 2)
        return torch.ones_like(sigma)

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of sigma(t) for VE (used to sample sigma uniformly)."""
        c = self.cfg
        return torch.log(sigma / c.sigma_min) / math.log(c.sigma_max / c.sigma_min)

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times in [t_min, t_max] with the configured distribution."""
        c = self.cfg
        u = torch.rand(n, device=device, generator=generator)
        if c.t_sampling == "uniform":
            return c.t_min + (c.t_max - c.t_min) * u
        if c.t_sampling == "logit-normal":
            g = torch.randn(n, device=device, generator=generator)
            return c.t_min + (c.t_max - c.t_min) * torch.sigmoid(g)
        # uniform-sigma: sigma ~ U(sigma(t_min), sigma(t_max)); stresses high noise (DRL)
        lo, hi = (self.alpha_sigma_at(c.t_min)[1], self.alpha_sigma_at(c.t_max)[1])
        sigma = lo + (hi - lo) * u
        if self.kind == "ve":
            return self.t_of_sigma(sigma).clamp(c.t_min, c.t_max)
        raise ValueError("t_sampling 'uniform-sigma' needs the VE process")
