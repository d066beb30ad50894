"""Reconstruction against DDIM steps, with DDIM-inverted x_T and with random x_T.

inverted  encode z, run deterministic DDIM forwards x0 -> x_T (DiffAE's stochastic encoding),
          decode x_T with deterministic DDIM on the same grid: how well z + x_T reconstructs
random    decode from fresh noise x_T with the same z: what z alone keeps

A time-dependent encoder is read at every step's own t, z(t) = E(x0, t), because that is the code
its denoiser saw at that noise level in training (as Pipeline.reconstruct, interpolate and edit do).

MSE is on the [0, 1] pixel scale, averaged over pixels and images; `psnr` is 10 log10(1 / MSE) of
that mean (what `diffae reconstruct` prints); `psnr_per_image` averages each image's PSNR.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..diffusion import samplers
from ..engine.trainer import autocast

ZFn = Callable[[float], torch.Tensor]


def code_fn(pipe, x0: torch.Tensor) -> ZFn:
    """z for the denoiser at time t, cached per t: E(x0) for a static encoder, E(x0, t) otherwise."""
    model = pipe.model
    cache: dict[float, torch.Tensor] = {}

    def z_at(t: float) -> torch.Tensor:
        key = float(t) if model.encoder.time_dependent else None
        if key not in cache:
            tt = None if key is None else torch.full((x0.shape[0],), key, device=x0.device)
            with torch.no_grad(), autocast(pipe.device, pipe.cfg.train.bf16):
                cache[key] = model.encode_latent(x0, tt).z.float()
        return cache[key]
    return z_at


def lerp_codes(za: ZFn, zb: ZFn, weights: torch.Tensor) -> ZFn:
    """Codes along the segment from za to zb (each (1, z_dim) per t): (len(weights), z_dim) per t."""
    w = weights.view(-1, 1)
    return lambda t: torch.lerp(za(t).expand(w.shape[0], -1), zb(t).expand(w.shape[0], -1), w)


def denoiser(pipe, z_fn: ZFn):
    model = pipe.model

    def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device)
        with autocast(pipe.device, pipe.cfg.train.bf16):
            return model.denoise(x, tt, z_fn(t))
    return denoise


def prior_noise(pipe, n: int, generator: torch.Generator) -> torch.Tensor:
    """x_T ~ the process's prior at t = 1 (VE: N(0, sigma_max^2))."""
    m, d = pipe.cfg.model, pipe.cfg.diffusion
    x = torch.randn(n, m.channels, m.img_size, m.img_size, generator=generator, device=pipe.device)
    return x * d.sigma_max if d.process == "ve" else x


@torch.no_grad()
def invert(pipe, x0: torch.Tensor, z_fn: ZFn, steps: int) -> torch.Tensor:
    return samplers.ddim_invert(denoiser(pipe, z_fn), x0, pipe.model.process, steps, pipe.model.sampling_prediction)


@torch.no_grad()
def decode(pipe, x_T: torch.Tensor, z_fn: ZFn, steps: int, clip: float) -> torch.Tensor:
    return samplers.sample(denoiser(pipe, z_fn), x_T, pipe.model.process, steps, "ddim",
                           pipe.model.sampling_prediction, clip=clip).clamp(-1, 1)


@torch.no_grad()
def reconstruct(pipe, x0: torch.Tensor, steps: int, invert_x: bool = True, seed: int = 0) -> torch.Tensor:
    """One batch: images in [-1, 1] on pipe.device -> reconstructions."""
    z_fn = code_fn(pipe, x0)
    if invert_x:
        return decode(pipe, invert(pipe, x0, z_fn, steps), z_fn, steps, clip=0.0)  # no clipping: exact inverse
    g = torch.Generator(pipe.device).manual_seed(seed)
    return decode(pipe, prior_noise(pipe, x0.shape[0], g), z_fn, steps, clip=1.0)


def _errors(rec: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return ((rec.float() - x0.float()) / 2).pow(2).flatten(1).mean(1)  # per-image MSE on [0, 1]


def _summary(per_image: torch.Tensor) -> dict:
    mse = float(per_image.mean())
    per_psnr = 10 * torch.log10(1.0 / per_image.clamp_min(1e-10))
    return {"mse": mse, "psnr": math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
            "psnr_per_image": float(per_psnr.mean())}


@torch.no_grad()
def reconstruction_table(pipe, images: torch.Tensor, steps_list=(5, 10, 20, 50, 100), batch_size: int = 500,
                         seed: int = 0) -> list[dict]:
    """One row per step count: inverted and random-x_T MSE / PSNR over `images`."""
    rows = []
    for steps in steps_list:
        errs = {True: [], False: []}
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i:i + batch_size].to(pipe.device).float()
            for inv in (True, False):
                errs[inv].append(_errors(reconstruct(pipe, x0, steps, inv, seed + i), x0).cpu())
        inv_s, rnd_s = _summary(torch.cat(errs[True])), _summary(torch.cat(errs[False]))
        rows.append({"steps": int(steps), "n": int(images.shape[0]),
                     **{f"inverted_{k}": v for k, v in inv_s.items()},
                     **{f"random_{k}": v for k, v in rnd_s.items()}})
    return rows


@torch.no_grad()
def interpolate(pipe, a: torch.Tensor, b: torch.Tensor, n: int = 8, steps: int = 20) -> torch.Tensor:
    """DiffAE's interpolation: lerp the codes (per t for a time-dependent encoder), slerp the
    DDIM-inverted x_T.  a, b: (1, C, H, W) -> (n, C, H, W)."""
    from ..engine.pipeline import slerp

    pair = torch.cat([a, b]).to(pipe.device).float()
    z_fn = code_fn(pipe, pair)
    x_T = invert(pipe, pair, z_fn, steps)
    ws = torch.linspace(0, 1, n, device=pipe.device)
    zs = lerp_codes(lambda t: z_fn(t)[:1], lambda t: z_fn(t)[1:], ws)
    xs = torch.cat([slerp(x_T[:1], x_T[1:], float(w)) for w in ws])
    return decode(pipe, xs, zs, steps, clip=0.0)
