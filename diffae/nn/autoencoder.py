"""The diffusion autoencoder: encoder E(x0[, t]) + latent head + DiT denoiser D(x_t, t, z)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Config
from ..diffusion.objectives import loss_weight, sampling_prediction, target
from ..diffusion.process import Process
from ..errors import InputError
from ..profiling import nvtx_range
from .dit import DiT
from .encoder import Encoder
from .latent import Latent
from .views import apply_views, draw_views

DEFAULT_CODE_T = 0.5  # where a time-dependent encoder is read when no t is given


@dataclass
class LossOutput:
    loss: torch.Tensor      # scalar, what is minimised
    denoise: torch.Tensor   # scalar, the weighted denoising term
    reg: torch.Tensor       # scalar, the latent head's penalty


class DiffusionAutoencoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.process = Process(cfg.diffusion)
        self.encoder = Encoder(cfg.model, cfg.encoder)
        self.denoiser = DiT(cfg.model, cfg.encoder.z_dim)

    # --- inputs -----------------------------------------------------------------------------
    def check_images(self, x: torch.Tensor, name: str = "images") -> torch.Tensor:
        m = self.cfg.model
        want = (m.channels, m.img_size, m.img_size)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise InputError(f"{name} must be (B, {want[0]}, {want[1]}, {want[2]}) for preset "
                             f"{self.cfg.preset!r}, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise InputError(f"{name} is an empty batch")
        if not x.is_floating_point():
            raise InputError(f"{name} must be floating point in [-1, 1], got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"{name} contain NaN or Inf")
        device = next(self.parameters()).device
        if x.device != device:
            raise InputError(f"{name} are on {x.device} but the model is on {device}")
        return x

    def check_latents(self, z: torch.Tensor, n: int | None = None) -> torch.Tensor:
        zd = self.cfg.encoder.z_dim
        if z.dim() != 2 or z.shape[1] != zd or (n is not None and z.shape[0] != n):
            raise InputError(f"z must be ({n or 'B'}, {zd}), got shape {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise InputError("z contains NaN or Inf")
        return z

    # --- the two networks -------------------------------------------------------------------
    def encode_latent(self, x0: torch.Tensor, t: torch.Tensor | None = None, sample: bool = False,
                      noise: torch.Tensor | None = None) -> Latent:
        return self.encoder(x0, self._code_t(x0, t), sample=sample, noise=noise)

    def _code_t(self, x0: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        """The encoder's t: DEFAULT_CODE_T where none is given, None for a static encoder."""
        if not self.encoder.time_dependent:
            return None
        return torch.full((x0.shape[0],), DEFAULT_CODE_T, device=x0.device) if t is None else t

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None, net=None,
                cond=None) -> torch.Tensor:
        """Network output for x_t at times t (B,) given z; input scaling for the process applied.
        `net` replaces the denoiser module (an inference copy); `cond`, its conditioning at t for z
        (DiT.condition, computed once per sampling loop), replaces z."""
        alpha, sigma = self.process.alpha_sigma(t)
        scale = self.process.input_scale(alpha, sigma).view(-1, 1, 1, 1)
        dit = self.denoiser if net is None else net
        x = x_t * scale.to(x_t.dtype)
        return dit(x, t, z) if cond is None else dit.run(x, cond)

    @property
    def sampling_prediction(self) -> str:
        return sampling_prediction(self.cfg.diffusion.prediction)

    # --- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x0: torch.Tensor, t: float | list[float] | None = None, pooled: bool = False) -> torch.Tensor:
        """Semantic embedding of images in [-1, 1]: (B, z_dim), or (B, len(t) * z_dim) when t is a
        list (a time-dependent encoder's codes at several noise levels, concatenated).  pooled: the
        encoder's pooled features that the code is read from instead, (B, encoder.dim) per t (a
        probe's usual readout below a projection head)."""
        self.check_images(x0)
        if t is None or isinstance(t, (int, float)):
            tt = None if t is None else torch.full((x0.shape[0],), float(t), device=x0.device)
            if pooled:
                return self.encoder.features(x0, self._code_t(x0, tt)).float()
            return self.encode_latent(x0, tt).embedding.float()
        if not self.encoder.time_dependent:
            raise InputError("a list of t needs a time-dependent encoder (encoder.kind='time')")
        return torch.cat([self.encode(x0, float(ti), pooled) for ti in t], -1)

    @torch.no_grad()
    def denoiser_features(self, x0: torch.Tensor, t: float, blocks: list[int],
                          generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The denoiser's own features of images in [-1, 1], a readout beside the code (as in DDAE,
        Xiang et al. 2023, which probes a diffusion model's activations): x0 noised to x_t at time t
        (eps drawn from `generator`), D run under the code it was trained with at t (E(x0, t), or
        E(x0)), the residual stream after each of `blocks` (0-based) averaged over tokens.
        A list of (B, model.dim) fp32, one per block."""
        self.check_images(x0)
        if not 0.0 <= t <= 1.0:
            raise InputError(f"t must be in [0, 1], got {t}")
        tt = torch.full((x0.shape[0],), float(t), device=x0.device)
        z = self.encode_latent(x0, self._code_t(x0, tt)).z
        alpha, sigma = self.process.alpha_sigma(tt)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = alpha.view(-1, 1, 1, 1) * x0.float() + sigma.view(-1, 1, 1, 1) * eps
        x_t = x_t * self.process.input_scale(alpha, sigma).view(-1, 1, 1, 1)
        return self.denoiser.block_features(x_t, self.denoiser.condition(tt, z)[0], blocks)

    def draw_noise(self, n: int, device, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The randomness of one loss evaluation on n images: times "t" (n,), Gaussian noise "eps"
        (n, C, H, W), for a sampled code the latent head's "latent" (n, z_dim), and when the
        encoder trains on other views of x0 (encoder.view_*) their affine maps "view" (n, 2, 3).

        Apart from the loss so that data-parallel ranks can each draw it for the whole global batch
        (in step, from one seed) and take their slice: a run then does not depend on the number of
        ranks or micro-batches, and no random op sits inside a compiled graph."""
        m = self.cfg.model
        noise = {"t": self.process.sample_t(n, device, generator),
                 "eps": torch.randn((n, m.channels, m.img_size, m.img_size), device=device, generator=generator)}
        latent = self.encoder.head.draw_noise(n, device, generator)
        if latent is not None:
            noise["latent"] = latent
        e = self.cfg.encoder
        if e.view_min_area < 1.0 or e.view_flip:
            noise["view"] = draw_views(n, e.view_min_area, e.view_flip, device, generator)
        return noise

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None,
             noise: dict[str, torch.Tensor] | None = None) -> LossOutput:
        """One Monte-Carlo estimate of the training objective on a batch of clean images; `noise`
        (see draw_noise, sliced to the batch) is drawn from `generator` when not given."""
        B = x0.shape[0]
        d = self.cfg.diffusion
        if noise is None:
            noise = self.draw_noise(B, x0.device, generator)
        t, eps = noise["t"], noise["eps"]
        alpha, sigma = self.process.alpha_sigma(t)
        a4, s4 = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        x_t = a4 * x0 + s4 * eps
        with nvtx_range("encoder"):
            seen = apply_views(x0, noise["view"]) if "view" in noise else x0
            latent = self.encode_latent(seen, t, sample=True, noise=noise.get("latent"))
        with nvtx_range("denoiser"):
            out = self.denoise(x_t, t, latent.z)
        per_sample = (out.float() - target(d.prediction, x0, eps, a4, s4)).pow(2).mean((1, 2, 3))
        w = loss_weight(d.prediction, d.weighting, alpha, sigma, d.min_snr_gamma)
        denoise_loss = (w * per_sample).mean()
        return LossOutput(denoise_loss + latent.reg, denoise_loss, latent.reg)
