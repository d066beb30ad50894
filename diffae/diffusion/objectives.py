"""Training targets and loss weights for each prediction type.

eps    network predicts the noise
v      network predicts v = alpha*eps - sigma*x0
x0     network predicts the clean image
score  (VE) network output F gives s = -F / sigma; with lambda(t) = sigma^2 the score-matching
       loss lambda ||s - grad log p|| ^2 equals ||F - eps||^2, so the target is eps (DRL's objective)
"""
from __future__ import annotations

import torch


def target(pred: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    if pred in ("eps", "score"):
        return eps
    if pred == "v":
        return alpha * eps - sigma * x0
    return x0


def sampling_prediction(pred: str) -> str:
    """The prediction type the sampler sees ('score' outputs are eps-shaped, see above)."""
    return "eps" if pred == "score" else pred


def loss_weight(pred: str, weighting: str, alpha: torch.Tensor, sigma: torch.Tensor, gamma: float):
    """Per-sample weights; 'min-snr' clips the implied x0-space weight at gamma (Hang et al. 2023)."""
    if weighting == "none":
        return torch.ones_like(alpha)
    snr = (alpha / sigma.clamp_min(1e-8)) ** 2
    clipped = snr.clamp(max=gamma)
    if pred in ("eps", "score"):
        return clipped / snr.clamp_min(1e-8)
    if pred == "v":
        return clipped / (snr + 1)
    return clipped
