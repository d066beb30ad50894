"""The DiT denoiser D(x_t, t, z) with three ways for z to enter."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from .layers import AdaLNBlock, PatchEmbed, TimestepEmbedding, run_block


class DiT(nn.Module):
    """Patchify, AdaLN-Zero blocks, modulated final layer, unpatchify.

    conditioning: 'adaln'      c = emb(t) + W z drives every block's AdaLN-Zero
                  'scale'      c = emb(t); z gives each sublayer a multiplicative (1 + W z) (DiffAE)
                  'cross-attn' c = emb(t); z becomes z_tokens extra keys/values in self-attention (DMZ)
    """

    def __init__(self, cfg: ModelConfig, z_dim: int):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.x_embed = PatchEmbed(cfg.channels, dim, cfg.patch, cfg.img_size)
        self.t_embed = TimestepEmbedding(dim)
        mode = cfg.conditioning
        self.z_proj = nn.Linear(z_dim, dim) if mode == "adaln" else None
        self.z_scale = nn.Linear(z_dim, 2 * dim * cfg.depth) if mode == "scale" else None
        self.z_tokens = nn.Linear(z_dim, cfg.z_tokens * dim) if mode == "cross-attn" else None
        if self.z_scale is not None:  # starts as plain AdaLN; z learns to scale
            nn.init.zeros_(self.z_scale.weight)
            nn.init.zeros_(self.z_scale.bias)
        self.blocks = nn.ModuleList(AdaLNBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.qk_norm,
                                               cross_tokens=mode == "cross-attn") for _ in range(cfg.depth))
        self.final_ada = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, cfg.patch * cfg.patch * cfg.channels)
        for layer in (self.final_ada, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        c = self.t_embed(t)  # (B, dim)
        h = self.x_embed(x)  # (B, N, dim)
        z_scales = z_tokens = None
        if self.z_proj is not None:
            c = c + self.z_proj(z)
        elif self.z_scale is not None:
            z_scales = self.z_scale(z).chunk(self.cfg.depth, -1)  # depth x (B, 2*dim)
        else:
            z_tokens = self.z_tokens(z).view(B, self.cfg.z_tokens, self.cfg.dim)
        for i, block in enumerate(self.blocks):
            h = run_block(block, self.cfg.activation_checkpointing, h, c,
                          None if z_scales is None else z_scales[i], z_tokens)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, -1)
        h = self.out(ops.adaln_modulate(h, shift, scale))  # (B, N, p*p*C)
        return self.unpatchify(h)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        cfg, B = self.cfg, h.shape[0]
        g, p = cfg.img_size // cfg.patch, cfg.patch
        h = h.reshape(B, g, g, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, cfg.channels, cfg.img_size, cfg.img_size)
