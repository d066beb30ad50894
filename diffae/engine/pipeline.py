"""Inference API over a trained checkpoint: encode, sample, reconstruct, interpolate.

    pipe = Pipeline.from_checkpoint("runs/dae-tiny/last.pt")
    images = pipe.sample(16, steps=10, sampler="dpmpp2m", seed=0)   # (16, C, H, W) in [-1, 1]
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..diffusion import samplers
from ..diffusion.process import Process
from ..errors import CheckpointError, ConfigError, InputError
from ..nn.autoencoder import DiffusionAutoencoder
from ..nn.latent_prior import LatentPrior
from . import checkpoint
from .trainer import autocast


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per sample (for Gaussian noise x_T)."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-12)
    theta = torch.acos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(theta).clamp_min(1e-6)
    out = (torch.sin((1 - w) * theta) * af + torch.sin(w * theta) * bf) / sin
    return out.view_as(a)


class Pipeline:
    def __init__(self, model: DiffusionAutoencoder, prior: LatentPrior | None = None):
        self.model = model.eval().requires_grad_(False)
        self.prior = prior
        self.cfg = model.cfg
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        use_ema: bool = True) -> "Pipeline":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        payload = checkpoint.load(path, map_location=device)
        cfg = checkpoint.config_of(payload, path)
        model = DiffusionAutoencoder(cfg).to(device)
        checkpoint.load_model_state(model, payload["ema" if use_ema else "model"], path)
        prior = None
        if "latent_prior" in payload:
            p = payload["latent_prior"]
            prior = LatentPrior(int(p["z_dim"]), int(p["width"]), int(p["depth"])).to(device)
            checkpoint.load_model_state(prior, p["state"], path, "latent prior")
            prior.eval().requires_grad_(False)
        return cls(model, prior)

    # --- pieces -----------------------------------------------------------------------------
    def _denoise_fn(self, z: torch.Tensor):
        def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
            tt = torch.full((x.shape[0],), t, device=x.device)
            with autocast(self.device, self.cfg.train.bf16):
                return self.model.denoise(x, tt, z)
        return denoise

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        m = self.cfg.model
        x = torch.randn(n, m.channels, m.img_size, m.img_size, generator=generator, device=self.device)
        if self.cfg.diffusion.process == "ve":
            x = x * self.cfg.diffusion.sigma_max  # VE's prior at t = 1 is N(0, sigma_max^2)
        return x

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g

    def _as_images(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor, got {type(x).__name__}")
        return self.model.check_images(x.to(self.device).float())

    # --- public -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, t: float | list[float] | None = None, batch_size: int = 512):
        images = self._as_images(images)
        outs = []
        for i in range(0, images.shape[0], batch_size):
            with autocast(self.device, self.cfg.train.bf16):
                outs.append(self.model.encode(images[i:i + batch_size], t).float())
        return torch.cat(outs)

    @torch.no_grad()
    def sample_latents(self, n: int, steps: int = 50, seed: int | None = 0) -> torch.Tensor:
        """z for unconditional generation: the latent prior's samples, or the head's own prior
        (Bernoulli bits, or N(0, I) for a Gaussian code)."""
        g = self._generator(seed)
        zd = self.cfg.encoder.z_dim
        if self.prior is not None:
            zs = torch.randn(n, zd, generator=g, device=self.device)
            zs = samplers.sample(lambda z, t: self.prior(z, torch.full((z.shape[0],), t, device=z.device)),
                                 zs, Process(self.cfg.diffusion.__class__(process="vp-cosine")), steps,
                                 "ddim", clip=0.0)
            return self.prior.destandardise(zs)
        if self.cfg.encoder.latent == "deterministic":
            raise CheckpointError("this checkpoint has no latent prior, and a deterministic code has no "
                                  "prior of its own: train one (diffae train --prior-steps N) or pass z")
        return self.model.encoder.head.prior_sample(n, zd, generator=g, device=self.device)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 20, sampler: str = "ddim", seed: int | None = 0,
               z: torch.Tensor | None = None, eta: float | None = None, prior_steps: int = 50) -> torch.Tensor:
        """n images in [-1, 1]; z from the latent prior unless given."""
        if n < 1:
            raise InputError(f"number of samples must be >= 1, got {n}")
        if sampler not in samplers.SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        z = self.sample_latents(n, prior_steps, seed) if z is None else self.model.check_latents(z.to(self.device), n)
        g = self._generator(None if seed is None else seed + 1)
        x = self._noise(n, g)
        out = samplers.sample(self._denoise_fn(z), x, self.model.process, steps, sampler,
                              self.model.sampling_prediction, eta=eta, generator=g)
        return out.clamp(-1, 1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, z: torch.Tensor, steps: int = 20) -> torch.Tensor:
        """DDIM inversion: x0 and z to x_T."""
        return samplers.ddim_invert(self._denoise_fn(z), images, self.model.process, steps,
                                    self.model.sampling_prediction)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, steps: int = 20, invert: bool = True, seed: int | None = 0):
        """Encode, (optionally) invert to x_T, decode with deterministic DDIM.
        Returns (reconstructions, {'mse', 'psnr'}) with images in [-1, 1] (PSNR on a [0, 1] scale)."""
        images = self._as_images(images)
        with autocast(self.device, self.cfg.train.bf16):
            z = self.model.encode_latent(images).z.float()
        x_T = self.invert(images, z, steps) if invert else self._noise(images.shape[0], self._generator(seed))
        rec = samplers.sample(self._denoise_fn(z), x_T, self.model.process, steps, "ddim",
                              self.model.sampling_prediction, clip=0.0 if invert else 1.0).clamp(-1, 1)
        mse = ((rec - images) / 2).pow(2).mean().item()  # on [0, 1]
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
        return rec, {"mse": mse, "psnr": psnr}

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, n: int = 8, steps: int = 20) -> torch.Tensor:
        """Images between a and b (each (1, C, H, W) or (C, H, W)): lerp z, slerp the inverted x_T.
        Returns (n, C, H, W)."""
        a, b = (x[None] if x.dim() == 3 else x for x in (a, b))
        pair = self._as_images(torch.cat([a, b]))
        if pair.shape[0] != 2:
            raise InputError("interpolate takes exactly one image at each end")
        with autocast(self.device, self.cfg.train.bf16):
            z = self.model.encode_latent(pair).z.float()
        x_T = self.invert(pair, z, steps)
        ws = torch.linspace(0, 1, n, device=self.device)
        zs = torch.stack([torch.lerp(z[0], z[1], w) for w in ws])
        xs = torch.cat([slerp(x_T[:1], x_T[1:], float(w)) for w in ws])
        return samplers.sample(self._denoise_fn(zs), xs, self.model.process, steps, "ddim",
                               self.model.sampling_prediction, clip=0.0).clamp(-1, 1)
