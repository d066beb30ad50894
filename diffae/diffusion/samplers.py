"""Samplers with one signature, and DDIM inversion.

Every sampler runs `steps` updates over a schedule of (t, alpha, sigma) Python floats computed
before the loop, so the loop never reads device values (it can be compiled and captured in one
CUDA graph).  The update itself is diffae.ops.sampler_step; a sampler only chooses coefficients:

  ddim     x' = a' x0 + sqrt(s'^2 - c^2) eps + c noise, c = eta * a' (r'/r) sqrt(r^2 - r'^2), r = s/a
  ddpm     ddim with eta = 1 (ancestral)
  euler    Euler on the probability-flow ODE in (x/a, s/a): with these variables it coincides with
           deterministic DDIM, as in k-diffusion and diffusers' Euler scheduler
  heun     Euler, then the trapezoidal correction with a second evaluation (2 NFE per step, 1 on the last)
  dpmpp2m  DPM-Solver++(2M) (Lu et al. 2022): multistep, second order in the x0 prediction

`denoise(x, t)` returns the network output for state x at time t (a float).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import ops
from ..errors import ConfigError
from .process import Process

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp2m")
Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def schedule(process: Process, steps: int, t_start: float = 1.0, t_end: float = 0.0):
    """steps + 1 points (t, alpha, sigma) from t_start down to t_end, uniform in t.
    The last point is made noiseless (alpha 1, sigma 0) so the final update returns an x0 estimate
    (VE's sigma(0) is sigma_min, not 0)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    ts = [t_start + (t_end - t_start) * i / steps for i in range(steps + 1)]
    points = [(t, *process.alpha_sigma_at(t)) for t in ts]
    if t_end == 0.0:
        points[-1] = (0.0, 1.0, 0.0)
    return points


def _ddim_coeffs(a, s, an, sn, eta):
    if sn == 0.0 or eta == 0.0:
        return (0.0, an, sn, 0.0, 0.0)
    r, rn = s / a, sn / an
    c = eta * an * (rn / r) * math.sqrt(max(r * r - rn * rn, 0.0))
    return (0.0, an, math.sqrt(max(sn * sn - c * c, 0.0)), 0.0, c)


def sample(denoise: Denoise, x: torch.Tensor, process: Process, steps: int, sampler: str = "ddim",
           pred: str = "eps", eta: float | None = None, clip: float = 1.0,
           generator: torch.Generator | None = None, t_start: float = 1.0, t_end: float = 0.0,
           points=None, noises: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Run `sampler` from x (at t_start) to t_end; returns the final state (fp32).

    noises: optional pre-drawn noise tensors for the stochastic samplers (one per step), so a
    captured CUDA graph and an eager run see the same randomness.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if eta is None:
        eta = 1.0 if sampler == "ddpm" else 0.0
    elif sampler != "ddim" and eta != (1.0 if sampler == "ddpm" else 0.0):
        raise ConfigError(f"eta applies to the ddim sampler only (got eta={eta} with {sampler})")
    points = points or schedule(process, steps, t_start, t_end)
    x = x.float()
    prev_x0, prev_h = None, None
    for i in range(len(points) - 1):
        (t, a, s), (tn, an, sn) = points[i], points[i + 1]
        out = denoise(x, t)
        if sampler in ("ddim", "ddpm", "euler"):
            coeffs = _ddim_coeffs(a, s, an, sn, eta)
            noise = None
            if coeffs[4] != 0.0:
                noise = noises[i] if noises is not None else torch.randn(
                    x.shape, device=x.device, generator=generator)
            x, _ = ops.sampler_step(x, out, None, noise, a, s, pred, clip, coeffs)
        elif sampler == "heun":
            x_pred, _ = ops.sampler_step(x, out, None, None, a, s, pred, clip, (0.0, an, sn, 0.0, 0.0))
            if sn == 0.0:
                x = x_pred
                continue
            out2 = denoise(x_pred, tn)
            d_ratio = sn / an - s / a  # step in sigma/alpha
            x, _ = ops.sampler_step(x_pred, out2, x, None, an, sn, pred, clip,
                                    (0.5, 0.0, 0.5 * an * d_ratio, 0.5 * an / a, 0.0))
        else:  # dpmpp2m
            if sn == 0.0:
                coeffs, prev, h = (0.0, an, 0.0, 0.0, 0.0), None, None
            else:
                h = math.log(an / sn) - math.log(a / s)
                cx, cd = sn / s, an - sn * a / s
                if prev_x0 is None:
                    coeffs, prev = (cx, cd, 0.0, 0.0, 0.0), None
                else:
                    w = 1.0 / (2.0 * prev_h / h)
                    coeffs, prev = (cx, cd * (1 + w), 0.0, -cd * w, 0.0), prev_x0
            x, x0 = ops.sampler_step(x, out, prev, None, a, s, pred, clip, coeffs)
            prev_x0, prev_h = x0, h
    return x


def predict_x0_eps(x, out, alpha: float, sigma: float, pred: str):
    """Both x0 and eps from a network output, without dividing by sigma for eps/v predictions
    (so it is exact at sigma = 0, where inversion starts)."""
    out = out.float()
    if pred == "eps":
        return (x - sigma * out) / alpha, out
    if pred == "v":
        n = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * out) / n, (sigma * x + alpha * out) / n
    if sigma == 0.0:
        raise ConfigError("DDIM inversion from t = 0 needs an eps or v prediction model")
    return out, (x - alpha * out) / sigma


@torch.no_grad()
def ddim_invert(denoise: Denoise, x0: torch.Tensor, process: Process, steps: int, pred: str = "eps",
                t_end: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM run forwards: x0 -> x_T (DiffAE's stochastic encoding).
    Decoding x_T with sample(..., sampler='ddim', steps) on the same grid reconstructs x0."""
    points = schedule(process, steps, t_end, 0.0)[::-1]  # same grid as decoding, ascending
    x = x0.float()
    for (t, a, s), (_, an, sn) in zip(points[:-1], points[1:]):
        x0_hat, eps_hat = predict_x0_eps(x, denoise(x, t), a, s, pred)
        x = an * x0_hat + sn * eps_hat
    return x
