"""DiffAE's latent prior: a small diffusion model over the (standardised) semantic codes z.

An MLP with skip connections (the input is concatenated back into every hidden layer), AdaLN-style
timestep conditioning, eps prediction, trained with an L1 loss on z standardised by the dataset's
mean and std (the DiffAE authors call the standardisation crucial).  Deviation from the paper: it
uses diffae's continuous cosine VP process instead of DDPM's constant beta = 0.008.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import TimestepEmbedding


class LatentPrior(nn.Module):
    def __init__(self, z_dim: int, width: int = 1024, depth: int = 10):
        super().__init__()
        self.z_dim, self.width, self.depth = z_dim, width, depth
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

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean
