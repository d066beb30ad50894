"""DiffAE's latent prior: a small diffusion model over the (standardised) semantic codes z.

An MLP with skip connections (the input is concatenated back into every hidden layer), AdaLN-style
timestep conditioning, trained with an L1 loss on z standardised by the dataset's mean and std (the
DiffAE authors call the standardisation crucial).  Deviations from the paper: diffae's continuous
cosine VP process instead of DDPM's constant beta = 0.008, and v- instead of eps-prediction.  Why v:
DDIM turns an eps prediction into x0 = (z_t - sigma * eps) / alpha, and alpha(1) is 0.003 on the
cosine schedule, so an eps error of 0.06 near t = 1 (what 2000 steps of training left) became an x0
error of 26 standard deviations and prior samples with 8x the codes' spread; a v error maps to
an x0 error of the same size at every t.  Checkpoints record the prediction, so eps priors load.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiffusionConfig
from ..diffusion.process import Process
from .layers import TimestepEmbedding

PROCESS = Process(DiffusionConfig(process="vp-cosine"))  # the prior's own diffusion, whatever the model's
PREDICTIONS = ("v", "eps")


class LatentPrior(nn.Module):
    def __init__(self, z_dim: int, width: int = 1024, depth: int = 10, prediction: str = "v"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"latent prior prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.z_dim, self.width, self.depth, self.prediction = z_dim, width, depth, prediction
        self.t_embed = TimestepEmbedding(width)
        self.inp = nn.Linear(z_dim, width)
        self.layers = nn.ModuleList(nn.Linear(width + z_dim, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width, elementwise_affine=False) for _ in range(depth))
        self.mods = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.out = nn.Linear(width, z_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("mean", torch.zeros(z_dim))
        self.register_buffer("std", torch.ones(z_dim))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = F.silu(self.t_embed(t))
        h = self.inp(z_t)
        for layer, norm, mod in zip(self.layers, self.norms, self.mods):
            shift, scale = mod(c).chunk(2, -1)
            h = h + F.silu(norm(layer(torch.cat([h, z_t], -1))) * (1 + scale) + shift)
        return self.out(h)

    def loss(self, zs: torch.Tensor) -> torch.Tensor:
        """L1 denoising loss on a batch of standardised codes, at t ~ U(0, 1)."""
        t = torch.rand(zs.shape[0], device=zs.device)
        alpha, sigma = (a[:, None] for a in PROCESS.alpha_sigma(t))
        eps = torch.randn_like(zs)
        target = alpha * eps - sigma * zs if self.prediction == "v" else eps
        return (self(alpha * zs + sigma * eps, t) - target).abs().mean()

    def config(self) -> dict:
        """What a checkpoint needs to rebuild this module (beside its state_dict)."""
        return {"z_dim": self.z_dim, "width": self.width, "depth": self.depth, "prediction": self.prediction}

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean
