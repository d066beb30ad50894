"""Transformer building blocks shared by the DiT denoiser and the ViT encoders.

Every hot op goes through diffae.ops (AdaLN modulate, gated residual, attention), so the kernels
plug in without touching model code.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .. import ops


def gemm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a Linear on x computes in when it is not x's own: autocast's, when autocast is on
    for x's device.  The AdaLN ops write their output in it, sparing autocast a cast pass."""
    kind = x.device.type  # meta tensors (FLOP counting) have no autocast state
    return torch.get_autocast_dtype(kind) if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) else None


# DIFFAE_NESTED_BLOCKS=1: under torch.compile every AdaLN block is one nested compile region,
# traced and compiled once and reused by the blocks after it.  Off by default: on an H100 it cut
# dae-b's cold first compile from 80.2 to 65.9 s but ran the step 1 % slower (2731 against 2760
# img/s; benchmarks/results/session19), a good trade only for short runs.
NESTED_BLOCKS = os.environ.get("DIFFAE_NESTED_BLOCKS", "0") == "1"


def run_block(block: nn.Module, checkpointed: bool, *args) -> torch.Tensor:
    """block(*args); with activation checkpointing, only the block's inputs are kept for the
    backward pass, which recomputes the rest (non-reentrant: works under torch.compile and DDP)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    if NESTED_BLOCKS and torch.compiler.is_compiling() and isinstance(block, AdaLNBlock):
        # a region's inputs must not alias each other, and the modulations are views of one tensor
        x, h, mod, next_mod, kv = args
        return _block_region(block, x, h, mod.clone(), None if next_mod is None else next_mod.clone(), kv)
    return block(*args)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of 1000*t (t in [0, 1]) followed by a two-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = 1000.0 * t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(a), torch.sin(a)], -1))  # (B, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens, plus a learned positional embedding."""

    def __init__(self, channels: int, dim: int, patch: int, img_size: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None

    def forward(self, x: torch.Tensor, kv_extra: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim)  # packed, no permute
        if kv_extra is not None:
            kv_extra = kv_extra.to(qkv.dtype)
        return self.proj(ops.attention(qkv, self.q_norm, self.k_norm, kv_extra))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


def shift_scale(mod: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (shift, scale) that start every modulation: a block's (B, 6C) and the final layer's (B, 2C)."""
    return mod[:, :C], mod[:, C:2 * C]


def run_blocks(blocks, checkpointed: bool, x: torch.Tensor, mods: list, kv: list | None = None,
               taps: list | None = None):
    """x through AdaLN blocks, mods[i] modulating block i and mods[len(blocks)] (None if nothing
    follows) the input it hands on.  Only the first input is modulated here: every later one comes
    out of the previous block's last residual op.  Returns (the residual stream, that last input);
    `taps`, when given, receives the residual stream after every block."""
    h = ops.adaln_modulate(x, *shift_scale(mods[0], x.shape[-1]), out_dtype=gemm_dtype(x))
    for i, block in enumerate(blocks):
        x, h = run_block(block, checkpointed, x, h, mods[i], mods[i + 1], None if kv is None else kv[i])
        if taps is not None:
            taps.append(x)
    return x, h


class AdaLNBlock(nn.Module):
    """Transformer block with AdaLN-Zero: shift, scale and gate of both sublayers come from
    `mod` = ada(silu(c)) (B, 6*dim), c the conditioning vector; the gates start at zero so every
    block starts as identity.  The caller computes every block's `mod` (`DiT.condition`, which
    runs all blocks' projections as one GEMM and folds DiffAE's z scales into them).

    Each residual update is fused with the LayerNorm + modulate of the sublayer after it, the next
    block's included: a block takes its first sublayer's input h from its caller and returns the
    next block's, one pass over the activations per sublayer.
    kv_extra (B, M, 2, H, D) are keys/values of extra tokens every query also attends to (cross-attention on z).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 cross_tokens: bool = False, conditioned: bool = True):
        """conditioned=False: no projection of its own; the caller owns the modulations."""
        super().__init__()
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim) if conditioned else None
        self.kv = nn.Linear(dim, 2 * dim) if cross_tokens else None
        if conditioned:
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, x, h, mod, next_mod=None, kv_extra=None):
        """x: the residual stream (B, N, C); h: x's LayerNorm modulated by mod; next_mod: the modulation
        whose leading (shift, scale) the next block (or final layer) applies, None if nothing follows.
        Returns (x, the next input h, or None without next_mod)."""
        C = x.shape[-1]
        gate1, shift2, scale2, gate2 = mod[:, 2 * C:].chunk(4, -1)  # each (B, C)
        # the sublayers' inputs come out of the ops in the GEMMs' dtype, and their outputs go in at
        # their own (autocast) dtype, upcast in registers: no cast pass over the activations
        out_dtype = gemm_dtype(x)
        x, h = ops.gated_residual_adaln(x, gate1, self.attn(h, kv_extra), shift2, scale2, out_dtype=out_dtype)
        y = self.mlp(h)
        if next_mod is None:
            return ops.gated_residual(x, gate2, y), None
        return ops.gated_residual_adaln(x, gate2, y, *shift_scale(next_mod, C), out_dtype=out_dtype)


_block_region = torch.compiler.nested_compile_region(AdaLNBlock.forward)
