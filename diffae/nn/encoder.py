"""ViT encoders: static E(x0) and time-dependent E(x0, t).

Both use the AdaLN-Zero block.  The time-dependent encoder conditions every block on an embedding
of t (so each image maps to a curve of codes over t, as in DRL and the multi-level DAE); the
static encoder conditions on a learned constant, which makes its AdaLN a learned affine LayerNorm
with zero-initialised residual gates.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EncoderConfig, ModelConfig
from .latent import Latent, make_latent_head
from .layers import AdaLNBlock, PatchEmbed, TimestepEmbedding, run_blocks


class Encoder(nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.time_dependent = cfg.kind == "time"
        self.checkpointing = model_cfg.activation_checkpointing
        self.x_embed = PatchEmbed(model_cfg.channels, cfg.dim, cfg.patch, model_cfg.img_size)
        if self.time_dependent:
            self.t_embed = TimestepEmbedding(cfg.dim)
        else:
            self.const = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(AdaLNBlock(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = make_latent_head(cfg.latent, cfg.dim, cfg.z_dim, cfg.l1_weight, cfg.kl_weight)

    def forward(self, x0: torch.Tensor, t: torch.Tensor | None = None, sample: bool = False,
                noise: torch.Tensor | None = None) -> Latent:
        """noise: the latent head's sampling noise (see its draw_noise), drawn by the head if None."""
        B = x0.shape[0]
        if self.time_dependent:
            if t is None:
                raise ValueError("a time-dependent encoder needs t")
            c = self.t_embed(t)
        else:
            c = self.const.expand(B, -1)
        s = F.silu(c)
        mods = [block.ada(s) for block in self.blocks] + [None]  # nothing follows the last block
        r, _ = run_blocks(self.blocks, self.checkpointing, self.x_embed(x0), mods)
        return self.head(self.norm(r.mean(1).float()), sample=sample, noise=noise)  # pooled (B, dim) -> Latent
