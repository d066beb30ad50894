"""The DiT denoiser D(x_t, t, z) with three ways for z to enter."""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .layers import AdaLNBlock, PatchEmbed, TimestepEmbedding, run_blocks


class Conditioning(NamedTuple):
    """One step's inputs to the blocks besides the tokens (DiT.condition)."""
    mods: list[torch.Tensor]        # per block (B, 6*dim) AdaLN-Zero modulation, z's scales folded
                                    # in; then the final layer's (B, 2*dim); each starts with (shift, scale)
    kv: list[torch.Tensor] | None   # per block (B, M, 2, H, D): keys and values of z's tokens (cross-attn)


def fold_z_scale(mod: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """DiffAE's (1 + zs) * (LN(x) (1 + scale) + shift) as a plain AdaLN modulation:
    shift' = shift (1 + zs), scale' = scale (1 + zs) + zs, so the fused op is unchanged.
    mod (..., 6, C) is (shift, scale, gate) of both sublayers, zs (..., 2, C) their z scales."""
    m = mod.unflatten(-2, (2, 3))  # (..., sublayer, [shift, scale, gate], C)
    z = zs.unsqueeze(-2)  # (..., sublayer, 1, C)
    shift_scale = m[..., :2, :] * (1 + z) + torch.cat([torch.zeros_like(z), z], -2)
    return torch.cat([shift_scale, m[..., 2:, :]], -2).flatten(-3, -2)


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
        return self.run(x, self.condition(t, z)[0])

    def run(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser on x (B, C, H, W) under one step's conditioning (see condition)."""
        _, h = run_blocks(self.blocks, self.cfg.activation_checkpointing, self.x_embed(x), *cond)
        return self.unpatchify(self.out(h))  # h: the final layer's modulated input (B, N, p*p*C)

    def block_features(self, x: torch.Tensor, cond: Conditioning, blocks: list[int]) -> list[torch.Tensor]:
        """The residual stream after each of `blocks` (0-based), averaged over tokens: (B, dim) fp32
        each, the denoiser's own features of x.  Runs only as many blocks as the deepest one needs."""
        if not blocks or min(blocks) < 0 or max(blocks) >= len(self.blocks):
            raise ValueError(f"blocks must be indices in [0, {len(self.blocks)}), got {blocks}")
        n = max(blocks) + 1
        taps: list[torch.Tensor] = []
        run_blocks(self.blocks[:n], False, self.x_embed(x), [*cond.mods[:n], None],
                   None if cond.kv is None else cond.kv[:n], taps=taps)
        return [taps[b].float().mean(1) for b in blocks]

    def condition(self, t: torch.Tensor, z: torch.Tensor) -> list[Conditioning]:
        """What the blocks read besides the tokens, for S steps at once: t (S*B,) holds the S steps'
        times for the B latents z (B, z_dim), step-major (S = 1 in training).  One Conditioning per step.

        Independent of x_t, so a sampler computes every step's before its loop: the stacked AdaLN
        GEMM then reads its weights (half of the model) once per loop, not once per step.
        """
        cfg, B = self.cfg, z.shape[0]
        if t.dim() != 1 or t.shape[0] % B:
            raise ValueError(f"t must be (S*B,) for z of batch {B}, got shape {tuple(t.shape)}")
        S, dim, depth = t.shape[0] // B, cfg.dim, cfg.depth
        c = self.t_embed(t)  # (S*B, dim)
        if self.z_proj is not None:
            c = c + self.z_proj(z).repeat(S, 1)
        m = F.linear(F.silu(c), *self._stacked_ada_params())
        blocks = m[:, :depth * 6 * dim].view(S, B, depth, 6, dim)
        final = m[:, depth * 6 * dim:].view(S, B, 2 * dim)
        if self.z_scale is not None:
            blocks = fold_z_scale(blocks, self.z_scale(z).view(1, B, depth, 2, dim))
        kv = None
        if self.z_tokens is not None:
            tokens = self.z_tokens(z).view(B, cfg.z_tokens, dim)
            kv = [block.kv(tokens).view(B, cfg.z_tokens, 2, cfg.heads, dim // cfg.heads) for block in self.blocks]
        return [Conditioning([*blocks[s].flatten(-2).unbind(1), final[s]], kv) for s in range(S)]

    def _stacked_ada_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of every block's AdaLN projection and the final layer's, stacked: they
        all read silu(c), so they run as one GEMM.  Inference copies store the stack."""
        if self.stacked_ada is not None:
            return self.stacked_ada.weight, self.stacked_ada.bias
        layers = [b.ada for b in self.blocks] + [self.final_ada]
        return torch.cat([l.weight for l in layers]), torch.cat([l.bias for l in layers])

    @torch.no_grad()
    def inference_copy(self, weight_dtype: torch.dtype | None = None) -> "DiT":
        """A frozen copy for sampling, sharing nothing with this module.

        weight_dtype: store the Linear and Conv weights in it.  Pass autocast's dtype when the copy
        runs under autocast: those weights are then cast once here instead of on every call (a
        kernel and a read of every weight per call, which dominate few-step sampling at small
        batches), and the outputs are unchanged, since autocast rounds them the same way.
        The AdaLN projections of all blocks and of the final layer become one stacked GEMM.
        """
        net = copy.deepcopy(self).eval().requires_grad_(False)
        weight, bias = net._stacked_ada_params()
        stacked = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
        stacked.weight.copy_(weight)
        stacked.bias.copy_(bias)
        net.stacked_ada = stacked.requires_grad_(False)
        for block in net.blocks:  # the stacked copy is the only one left, so none can go stale
            block.ada = None
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
