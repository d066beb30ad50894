"""One fused sampler update, general enough for DDPM, DDIM, DPM-Solver++(2M), Euler and Heun.

With the model output `out` at noise level (alpha, sigma) of x:
    x0      = prediction converted to x0  (eps: (x - sigma*out)/alpha,  v: (alpha*x - sigma*out)/(alpha^2+sigma^2),
              x0: out), then clamped to [-clip, clip] when clip > 0
    eps     = (x - alpha*x0) / sigma      (0 where sigma == 0)
    x_next  = cx*x + cd*x0 + ce*eps + cp*prev + cn*noise
Each sampler only chooses the five coefficients (diffae.diffusion.samplers); the update itself
is one elementwise pass, which is what the C++/CUDA extension fuses.  State is fp32; `out` may
be bf16/fp16.  Returns (x_next, x0), both fp32.
"""
from __future__ import annotations

import torch

from ._backend import use_extension

PREDICTIONS = ("eps", "v", "x0")


def _check(x, out, prev, noise, pred, coeffs):
    if pred not in PREDICTIONS:
        raise ValueError(f"sampler_step: unknown prediction {pred!r}; choose one of {PREDICTIONS}")
    if out.shape != x.shape:
        raise ValueError(f"sampler_step: model output shape {tuple(out.shape)} != state shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"sampler_step: the sampler state must be float32, got {x.dtype}")
    if out.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"sampler_step: the model output must be float32, bfloat16 or float16, got {out.dtype}")
    for name, t in (("model output", out), ("prev", prev), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"sampler_step: {name} is on {t.device} but the state x is on {x.device}")
    if len(coeffs) != 5:
        raise ValueError("sampler_step: coeffs must be (cx, cd, ce, cp, cn)")
    for name, t, c in (("prev", prev, coeffs[3]), ("noise", noise, coeffs[4])):
        if t is None and c != 0.0:
            raise ValueError(f"sampler_step: coefficient for {name} is {c} but {name} is None")
        if t is not None and t.shape != x.shape:
            raise ValueError(f"sampler_step: {name} shape {tuple(t.shape)} != state shape {tuple(x.shape)}")
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"sampler_step: {name} must be float32, bfloat16 or float16 (used in fp32), "
                            f"got {t.dtype}")


def sampler_step_reference(x, out, prev, noise, alpha: float, sigma: float, pred: str, clip: float,
                           coeffs: tuple[float, float, float, float, float]):
    cx, cd, ce, cp, cn = coeffs
    out = out.float()
    if pred == "eps":
        x0 = (x - sigma * out) / alpha
    elif pred == "v":
        x0 = (alpha * x - sigma * out) / (alpha * alpha + sigma * sigma)
    else:
        x0 = out
    if clip > 0:
        x0 = x0.clamp(-clip, clip)
    eps = (x - alpha * x0) / sigma if sigma > 0 else torch.zeros_like(x)
    x_next = cx * x + cd * x0 + ce * eps
    if prev is not None:
        x_next = x_next + cp * prev.float()
    if noise is not None:
        x_next = x_next + cn * noise.float()
    return x_next, x0


def sampler_step(x: torch.Tensor, out: torch.Tensor, prev: torch.Tensor | None, noise: torch.Tensor | None,
                 alpha: float, sigma: float, pred: str, clip: float,
                 coeffs: tuple[float, float, float, float, float]):
    """See the module docstring; dispatches to diffae._C when built."""
    _check(x, out, prev, noise, pred, coeffs)
    if use_extension("sampler_step", x):
        from . import _ext
        if _ext.has_sampler_step():
            return _ext.sampler_step(x, out, prev, noise, alpha, sigma, pred, clip, coeffs)
    return sampler_step_reference(x, out, prev, noise, alpha, sigma, pred, clip, coeffs)
