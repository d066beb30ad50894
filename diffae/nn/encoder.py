"""ViT encoders: static E(x0) and time-dependent E(x0, t).

Both use the AdaLN-Zero block.  The time-dependent encoder conditions every block on an embedding
of t (so each image maps to a curve of codes over t, as in DRL and the multi-level DAE); the
static encoder has nothing to condition on, so each block's modulation is itself a learned vector
(zero-initialised, like the AdaLN-Zero projection it replaces): a learned affine LayerNorm with
residual gates that start at zero.
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
        else:  # (depth, 6 * dim): what a projection of a constant would give, without its weights
            self.mods = nn.Parameter(torch.zeros(cfg.depth, 6 * cfg.dim))
        self.blocks = nn.ModuleList(AdaLNBlock(cfg.dim, cfg.heads, conditioned=self.time_dependent)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = make_latent_head(cfg.latent, cfg.dim, cfg.z_dim, cfg.l1_weight, cfg.kl_weight)

    def forward(self, x0: torch.Tensor, t: torch.Tensor | None = None, sample: bool = False,
                noise: torch.Tensor | None = None) -> Latent:
        """noise: the latent head's sampling noise (see its draw_noise), drawn by the head if None."""
        return self.head(self.features(x0, t), sample=sample, noise=noise)

    def features(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled, normalised tokens (B, dim) that the latent head maps to the code."""
        B = x0.shape[0]
        if self.time_dependent:
            if t is None:
                raise ValueError("a time-dependent encoder needs t")
            s = F.silu(self.t_embed(t))
            mods = [block.ada(s) for block in self.blocks]
        else:
            mods = [m.expand(B, -1) for m in self.mods]
        mods.append(None)  # nothing follows the last block
        r, _ = run_blocks(self.blocks, self.checkpointing, self.x_embed(x0), mods)
        return self.norm(r.mean(1).float())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of diffae <= 0.1.0 hold a static encoder as a constant c and per-block
        # projections W, b: its modulations are W silu(c) + b, computed here once.
        const = state_dict.pop(prefix + "const", None)
        if const is not None and not self.time_dependent:
            s = F.silu(const.float())
            state_dict[prefix + "mods"] = torch.stack([
                state_dict.pop(f"{prefix}blocks.{i}.ada.weight").float() @ s
                + state_dict.pop(f"{prefix}blocks.{i}.ada.bias").float() for i in range(len(self.blocks))])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
