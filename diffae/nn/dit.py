"""The DiT denoiser D(x_t, t, z) with three ways for z to enter."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from .layers import AdaLNBlock, PatchEmbed, TimestepEmbedding, gemm_dtype, run_block


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
        self.stacked_ada: nn.Linear | None = None  # inference copies only: see inference_copy

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
        *mods, final = self.modulations(c)
        for i, (block, mod) in enumerate(zip(self.blocks, mods)):
            h = run_block(block, self.cfg.activation_checkpointing, h, mod,
                          None if z_scales is None else z_scales[i], z_tokens)
        shift, scale = final.chunk(2, -1)
        h = self.out(ops.adaln_modulate(h, shift, scale, out_dtype=gemm_dtype(h)))  # (B, N, p*p*C)
        return self.unpatchify(h)

    def modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every block's AdaLN-Zero modulation (B, 6*dim), then the final layer's (B, 2*dim).
        They all read silu(c), so an inference copy stacks their weights into one GEMM."""
        s = F.silu(c)
        if self.stacked_ada is not None:
            dim = self.cfg.dim
            return list(self.stacked_ada(s).split([6 * dim] * len(self.blocks) + [2 * dim], -1))
        return [block.ada(s) for block in self.blocks] + [self.final_ada(s)]

    @torch.no_grad()
    def inference_copy(self, weight_dtype: torch.dtype | None = None) -> "DiT":
        """A frozen copy for sampling, sharing nothing with this module.

        weight_dtype: store the Linear and Conv weights in it.  Pass autocast's dtype when the copy
        runs under autocast: those weights are then cast once here instead of on every call (a
        kernel and a read of every weight per call, which dominate few-step sampling at small
        batches), and the outputs are unchanged, since autocast rounds them the same way.
        The AdaLN projections of all blocks and of the final layer become one stacked GEMM, and
        each MLP's GELU becomes its first GEMM's epilogue.
        """
        net = copy.deepcopy(self).eval().requires_grad_(False)
        layers = [b.ada for b in net.blocks] + [net.final_ada]
        stacked = nn.Linear(self.cfg.dim, sum(l.out_features for l in layers),
                            device=self.final_ada.weight.device)
        stacked.weight.copy_(torch.cat([l.weight for l in layers]))
        stacked.bias.copy_(torch.cat([l.bias for l in layers]))
        net.stacked_ada = stacked.requires_grad_(False)
        for block in net.blocks:  # the stacked copy is the only one left, so none can go stale
            block.ada = None
            block.mlp.gelu_epilogue = True
        net.final_ada = None
        if weight_dtype is not None:
            for m in net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.to(weight_dtype)
        return net

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        cfg, B = self.cfg, h.shape[0]
        g, p = cfg.img_size // cfg.patch, cfg.patch
        h = h.reshape(B, g, g, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, cfg.channels, cfg.img_size, cfg.img_size)
