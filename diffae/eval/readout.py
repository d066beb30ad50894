"""The denoiser's own features as an embedding, beside the code: where to read them.

A diffusion autoencoder's denoiser is itself a representation learner (DDAE, Xiang et al. 2023,
probes a diffusion model's activations): run D on a lightly noised x_t under the image's own code,
average the residual stream after one block over tokens.  Which noise level and which block give the
most linearly separable features is not known in advance, so it is chosen here, on a held-out part
of the train split (never the test split): a linear probe fitted on the rest of train scores every
(t, block) and every t's blocks concatenated, and the best one is the readout the evaluation reports.
"""
from __future__ import annotations

import torch

from . import probe

TIMES = (0.05, 0.15, 0.3)       # light noise: x_t still shows the image (DDAE's best readouts are there)
DEPTH_FRACTIONS = (0.25, 0.5, 0.67, 0.83)  # of the denoiser's depth: blocks from early to late
VAL_FRAC = 1 / 6                # of train held out to choose (10000 of Fashion-MNIST's 60000)


def candidate_blocks(depth: int) -> list[int]:
    """0-based block indices at DEPTH_FRACTIONS of the depth (distinct, in order)."""
    return sorted({min(depth - 1, max(0, round(f * depth) - 1)) for f in DEPTH_FRACTIONS})


def choose(pipe, train_x: torch.Tensor, train_y: torch.Tensor, batch_size: int = 500, seed: int = 0,
           times=TIMES, log=None) -> dict:
    """Score every readout on a held-out part of train; returns the best as
    {"t", "blocks", "val_accuracy", "train_features" (N, D) for all of train_x, "scores": [...]}.
    `blocks` is one block, or several whose features are concatenated."""
    blocks = candidate_blocks(len(pipe.model.denoiser.blocks))
    n = train_x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(VAL_FRAC * n)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    best, scores = None, []
    for t in times:
        feats = pipe.denoiser_features(train_x, float(t), blocks, batch_size=batch_size, seed=seed)
        options = [([b], f) for b, f in zip(blocks, feats)]
        if len(blocks) > 1:
            options.append((blocks, torch.cat(feats, 1)))
        for chosen, x in options:
            y = train_y.to(x.device)
            acc = probe.linear_probe(x[fit_idx.to(x.device)], y[fit_idx.to(x.device)], x[val_idx.to(x.device)],
                                     y[val_idx.to(x.device)], seed=seed)["accuracy"]
            scores.append({"t": float(t), "blocks": chosen, "val_accuracy": acc})
            if log is not None:
                log(f"denoiser readout t={t:g} blocks {chosen}: held-out train accuracy {acc:.4f}")
            if best is None or acc > best["val_accuracy"]:
                best = {"t": float(t), "blocks": chosen, "val_accuracy": acc, "train_features": x}
    best["scores"] = scores
    return best


def features(pipe, images: torch.Tensor, t: float, blocks: list[int], batch_size: int = 500,
             seed: int = 0) -> torch.Tensor:
    """The chosen readout of images: (N, len(blocks) * dim)."""
    return torch.cat(pipe.denoiser_features(images, t, blocks, batch_size=batch_size, seed=seed), 1)
