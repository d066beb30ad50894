"""Inference API over a trained checkpoint: encode, sample, reconstruct, interpolate, edit.

    pipe = Pipeline.from_checkpoint("runs/dae-tiny/last.pt")
    images = pipe.sample(16, steps=10, sampler="dpmpp2m", seed=0)   # (16, C, H, W) in [-1, 1]
    d = pipe.attribute_direction(train_images, train_labels == 3)   # toward "Dress"
    edits = pipe.edit(test_images[:8], d, scales=(0, 1, 2))          # (3, 8, C, H, W)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..diffusion import samplers
from ..errors import CheckpointError, ConfigError, InputError
from ..nn.autoencoder import DiffusionAutoencoder
from ..nn.latent_prior import PROCESS as PRIOR_PROCESS, LatentPrior
from . import checkpoint
from .graphs import BUCKETS, GraphCache, bucket_for
from .trainer import autocast


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per sample (for Gaussian noise x_T)."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-12)
    theta = torch.acos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(theta).clamp_min(1e-6)
    out = (torch.sin((1 - w) * theta) * af + torch.sin(w * theta) * bf) / sin
    return out.view_as(a)


def sampling_network(model: DiffusionAutoencoder, denoiser):
    """(condition, network) with `denoiser` (an inference copy) in place of the model's own, each
    under autocast, for torch.compile to trace as one region:
      condition(t (S*B,), z (B, z_dim)): the conditioning of S steps at once (DiT.condition)
      network(x_t, t (B,), cond): the model's output, input scaling included, under one step's cond
    Closures over the model, not Pipeline methods: a compiled bound method would tie the pipeline
    into a reference cycle, left for the garbage collector to free (CUDA graphs included) at any
    moment, even while another pipeline captures."""
    device = next(model.parameters()).device

    def condition(t: torch.Tensor, z: torch.Tensor):
        with autocast(device, model.cfg.train.bf16):
            return denoiser.condition(t, z)

    def network(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        with autocast(device, model.cfg.train.bf16):
            return model.denoise(x, t, None, denoiser, cond)
    return condition, network


class Pipeline:
    """compile: torch.compile the denoiser (and latent prior) for inference.
    cuda_graph: capture whole sampling loops in CUDA graphs (CUDA only), one per batch bucket."""

    def __init__(self, model: DiffusionAutoencoder, prior: LatentPrior | None = None,
                 compile: bool = False, cuda_graph: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.prior = prior
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ConfigError("cuda_graph=True needs the model on a CUDA device")
        # sampling runs a frozen copy of the denoiser: weights pre-cast to the autocast dtype, AdaLN
        # projections stacked (DiT.inference_copy), so few-step loops skip a cast of every weight
        bf16 = self.device.type == "cuda" and self.cfg.train.bf16  # when autocast runs, see sampling_network
        self.eager_condition, self.eager_network = sampling_network(
            model, model.denoiser.inference_copy(torch.bfloat16 if bf16 else None))
        # compiled whole, so the input scaling fuses into the network's kernels; once per batch
        # bucket and step count (dynamic=False), more than dynamo's default limit of 8 recompiles,
        # past which it would fall back to eager without a word
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.condition = torch.compile(self.eager_condition, dynamic=False) if compile else self.eager_condition
        self.network = torch.compile(self.eager_network, dynamic=False) if compile else self.eager_network
        self.prior_net = None if prior is None else (torch.compile(prior, dynamic=False) if compile else prior)
        self.graphs = GraphCache(self._run) if cuda_graph else None
        self.last_capture_s = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None, use_ema: bool = True,
                        compile: bool = False, cuda_graph: bool = False) -> "Pipeline":
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        payload = checkpoint.load(path, map_location=device)
        cfg = checkpoint.config_of(payload, path)
        model = DiffusionAutoencoder(cfg).to(device)
        checkpoint.load_model_state(model, payload["ema" if use_ema else "model"], path)
        prior = None
        if "latent_prior" in payload:
            p = payload["latent_prior"]
            # checkpoints before the v-prediction prior have no "prediction": theirs predicted eps
            prior = LatentPrior(int(p["z_dim"]), int(p["width"]), int(p["depth"]),
                                str(p.get("prediction", "eps"))).to(device)
            checkpoint.load_model_state(prior, p["state"], path, "latent prior")
            prior.eval().requires_grad_(False)
        return cls(model, prior, compile=compile, cuda_graph=cuda_graph)

    # --- pieces -----------------------------------------------------------------------------
    def _denoise_fn(self, z, compiled: bool = False, points=None):
        """denoise(x, t: float) for the samplers; compiled: through the compiled network (when the
        pipeline compiles), else eager (inversion and reconstruction, run once per call).
        z: a (B, z_dim) code for every step, or a function of t giving each step's own code (a
        time-dependent encoder's E(x0, t): see _codes_at), conditioned step by step.
        points: the schedule the sampler runs (samplers.schedule); the conditioning at its times is
        computed up front, all steps in one batch, and any other t's when asked for."""
        condition, net = (self.condition, self.network) if compiled else (self.eager_condition, self.eager_network)
        if callable(z):
            def denoise_per_t(x: torch.Tensor, t: float) -> torch.Tensor:
                tt = torch.full((x.shape[0],), t, device=x.device)
                return net(x, tt, condition(tt, z(t))[0])
            return denoise_per_t
        B = z.shape[0]
        ts = [] if points is None else [p[0] for p in points[:-1]]  # the last point is never evaluated
        ready = {}  # t -> (t as a (B,) tensor, its Conditioning)
        if ts:
            t_all = torch.cat([torch.full((B,), t, device=z.device) for t in ts])
            ready = dict(zip(ts, zip(t_all.view(len(ts), B).unbind(0), condition(t_all, z))))

        def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
            if t in ready:
                tt, cond = ready[t]
            else:
                tt = torch.full((B,), t, device=z.device)
                cond = condition(tt, z)[0]
            return net(x, tt, cond)
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

    def _prior_sample(self, zs: torch.Tensor, steps: int) -> torch.Tensor:
        net = self.prior_net

        def denoise(z: torch.Tensor, t: float) -> torch.Tensor:
            return net(z, torch.full((z.shape[0],), t, device=z.device))
        z = samplers.sample(denoise, zs, PRIOR_PROCESS, steps, "ddim", self.prior.prediction, clip=0.0)
        return self.prior.destandardise(z)

    def _run(self, inputs: dict, steps: int, sampler: str, eta, prior_steps: int = 50) -> torch.Tensor:
        """The whole generation, from pre-drawn randomness to images; no host syncs (graph-capturable)."""
        z = inputs["z"] if "z" in inputs else self._prior_sample(inputs["zs"], prior_steps)
        noises = list(inputs["noises"].unbind(0)) if "noises" in inputs else None
        points = samplers.schedule(self.model.process, steps)
        x = samplers.sample(self._denoise_fn(z, compiled=True, points=points), inputs["x"], self.model.process,
                            steps, sampler, self.model.sampling_prediction, eta=eta, points=points, noises=noises)
        return x.clamp(-1, 1)

    # --- public -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, t: float | list[float] | None = None, batch_size: int = 512,
               pooled: bool = False):
        images = self._as_images(images)
        outs = []
        for i in range(0, images.shape[0], batch_size):
            with autocast(self.device, self.cfg.train.bf16):
                outs.append(self.model.encode(images[i:i + batch_size], t, pooled).float())
        return torch.cat(outs)

    @torch.no_grad()
    def denoiser_features(self, images: torch.Tensor, t: float, blocks: list[int], batch_size: int = 512,
                          seed: int = 0) -> list[torch.Tensor]:
        """DiffusionAutoencoder.denoiser_features over a dataset in batches: a list of (N, dim) fp32,
        one per block; the noise comes from one generator seeded with `seed`, so the same call
        gives the same features."""
        images = self._as_images(images)
        g = self._generator(seed)
        parts = []
        for i in range(0, images.shape[0], batch_size):
            with autocast(self.device, self.cfg.train.bf16):
                parts.append(self.model.denoiser_features(images[i:i + batch_size], t, blocks, g))
        return [torch.cat(per_block) for per_block in zip(*parts)]

    @torch.no_grad()
    def sample_latents(self, n: int, steps: int = 50, seed: int | None = 0) -> torch.Tensor:
        """z for unconditional generation: the latent prior's samples, or the head's own prior
        (Bernoulli bits, or N(0, I) for a Gaussian code)."""
        g = self._generator(seed)
        zd = self.cfg.encoder.z_dim
        if self.prior is not None:
            return self._prior_sample(torch.randn(n, zd, generator=g, device=self.device), steps)
        if self.cfg.encoder.latent == "deterministic":
            raise CheckpointError("this checkpoint has no latent prior, and a deterministic code has no "
                                  "prior of its own: train one (diffae train --prior-steps N) or pass z")
        return self.model.encoder.head.prior_sample(n, zd, generator=g, device=self.device)

    def _draw(self, n: int, steps: int, sampler: str, eta, seed, z, prior_steps: int) -> dict:
        """All the randomness of one generation, drawn in a fixed order from seeded generators."""
        inputs = {}
        if z is not None:
            inputs["z"] = self.model.check_latents(z.to(self.device).float(), n)
        elif self.prior is not None:
            inputs["zs"] = torch.randn(n, self.cfg.encoder.z_dim, generator=self._generator(seed), device=self.device)
        else:
            inputs["z"] = self.sample_latents(n, prior_steps, seed)
        g = self._generator(None if seed is None else seed + 1)
        inputs["x"] = self._noise(n, g)
        if sampler == "ddpm" or (sampler == "ddim" and eta):
            inputs["noises"] = torch.randn(steps, *inputs["x"].shape, generator=g, device=self.device)
        return inputs

    @torch.no_grad()
    def sample(self, n: int, steps: int = 20, sampler: str = "ddim", seed: int | None = 0,
               z: torch.Tensor | None = None, eta: float | None = None, prior_steps: int = 50) -> torch.Tensor:
        """n images in [-1, 1]; z from the latent prior unless given."""
        if n < 1:
            raise InputError(f"number of samples must be >= 1, got {n}")
        if sampler not in samplers.SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        inputs = self._draw(n, steps, sampler, eta, seed, z, prior_steps)
        if self.graphs is None:
            return self._run(inputs, steps, sampler, eta, prior_steps)
        outs = []
        for i in range(0, n, BUCKETS[-1]):
            part = {k: (v[:, i:i + BUCKETS[-1]] if k == "noises" else v[i:i + BUCKETS[-1]]) for k, v in inputs.items()}
            outs.append(self._replay(part, steps, sampler, eta, prior_steps))
        return torch.cat(outs)

    def _replay(self, inputs: dict, steps: int, sampler: str, eta, prior_steps: int) -> torch.Tensor:
        n = inputs["x"].shape[0]
        b = bucket_for(n)
        key = (b, steps, sampler, eta, tuple(sorted(inputs)), prior_steps)

        def make_static():  # random, not zeros: padded rows must stay finite through the network
            return {k: (torch.randn(v.shape[0], b, *v.shape[2:], device=self.device) if k == "noises"
                        else torch.randn(b, *v.shape[1:], device=self.device)) for k, v in inputs.items()}
        entry, captured = self.graphs.get(key, make_static)
        if captured:
            self.last_capture_s = entry.capture_s
        for k, v in inputs.items():
            (entry.inputs[k][:, :n] if k == "noises" else entry.inputs[k][:n]).copy_(v)
        entry.graph.replay()
        return entry.output[:n].clone()

    @torch.no_grad()
    def codes(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """z as the denoiser reads it, (B, z_dim) fp32: a time-dependent encoder's code at the one t
        that unconditional sampling and the latent prior use (reconstruct, interpolate and edit read
        it at every step's t instead)."""
        images = self._as_images(images)
        outs = []
        for i in range(0, images.shape[0], batch_size):
            with autocast(self.device, self.cfg.train.bf16):
                outs.append(self.model.encode_latent(images[i:i + batch_size]).z.float())
        return torch.cat(outs)

    def _codes_at(self, images: torch.Tensor):
        """z(t) for decoding these (checked) images at time t: the static code at every t, or a
        time-dependent encoder's E(x0, t) at each step's own t, the code its denoiser saw at that
        noise level in training (cached per t: inversion and decoding share the grid)."""
        if not self.model.encoder.time_dependent:
            z = self.codes(images)
            return lambda t: z
        cache: dict[float, torch.Tensor] = {}

        def z_at(t: float) -> torch.Tensor:
            if t not in cache:
                tt = torch.full((images.shape[0],), float(t), device=images.device)
                with autocast(self.device, self.cfg.train.bf16):
                    cache[t] = self.model.encode_latent(images, tt).z.float()
            return cache[t]
        return z_at

    @torch.no_grad()
    def attribute_direction(self, images: torch.Tensor, positive: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
        """DiffAE's editing direction for an attribute: a logistic regression on the codes of
        `images`, standardised per dimension, separating those marked `positive` (bool, (N,)) from
        the rest.  Returns its normal mapped back to z, (z_dim,), with the length of a typical
        standardised code (sqrt(z_dim)): adding s times it moves the code along the attribute's
        axis by s times its own size, whatever z_dim (dae-tiny on Fashion-MNIST: visible from about
        0.5, off the data beyond about 2)."""
        from ..eval.probe import fit_logistic
        positive = torch.as_tensor(positive)
        if positive.dim() != 1 or positive.shape[0] != len(images) or positive.dtype != torch.bool:
            raise InputError(f"positive must be a bool tensor of shape ({len(images)},), got "
                             f"{positive.dtype} {tuple(positive.shape)}")
        if positive.all() or not positive.any():
            raise InputError("positive must mark some of the images and not all: the direction separates two groups")
        z = self.codes(images)
        mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
        w = fit_logistic((z - mean) / std, positive.long().to(z.device), 2, [l2])[0]  # (z_dim + 1, 2)
        normal = w[:-1, 1] - w[:-1, 0]
        return normal / normal.norm().clamp_min(1e-12) * std * z.shape[1] ** 0.5

    @torch.no_grad()
    def edit(self, images: torch.Tensor, direction: torch.Tensor, scales=(0.0, 0.5, 1.0, 1.5, 2.0),
             steps: int = 20) -> torch.Tensor:
        """Move each image's code along `direction` (e.g. attribute_direction's) by every scale and
        decode from the image's own DDIM-inverted x_T, so what z does not hold (pose, texture) stays
        (a time-dependent encoder's code at every step's t, each moved alike).
        Returns (len(scales), B, C, H, W) in [-1, 1]; scale 0 is the reconstruction."""
        images = self._as_images(images)
        zd = self.cfg.encoder.z_dim
        direction = torch.as_tensor(direction, dtype=torch.float32, device=self.device)
        if direction.shape != (zd,) or not bool(torch.isfinite(direction).all()):
            raise InputError(f"direction must be a finite ({zd},) tensor, got shape {tuple(direction.shape)}")
        scales = [float(s) for s in scales]
        if not scales:
            raise InputError("edit needs at least one scale")
        z_at = self._codes_at(images)
        x_T = self.invert(images, z_at, steps)
        out = samplers.sample(self._denoise_fn(lambda t: torch.cat([z_at(t) + s * direction for s in scales])),
                              x_T.repeat(len(scales), 1, 1, 1), self.model.process, steps, "ddim",
                              self.model.sampling_prediction, clip=0.0).clamp(-1, 1)
        return out.view(len(scales), *images.shape)

    @torch.no_grad()
    def edit_toward_class(self, fit_images: torch.Tensor, fit_labels: torch.Tensor, target: int,
                          images: torch.Tensor, labels: torch.Tensor | None = None, n: int = 8,
                          scales=(0.0, 0.5, 1.0, 1.5, 2.0), steps: int = 20):
        """Edit toward a class: its direction fitted on (fit_images, fit_labels), then the first n
        of `images` not of that class (all of them without labels) moved along it.
        Returns (those originals (n, C, H, W), their edits (len(scales), n, C, H, W))."""
        positive = torch.as_tensor(fit_labels).cpu() == target
        if not positive.any():
            raise InputError(f"class {target} has no image among the {len(positive)} fit images")
        pick = (torch.arange(len(images)) if labels is None
                else (torch.as_tensor(labels).cpu() != target).nonzero().flatten())
        if pick.numel() == 0:
            raise InputError(f"every image is of class {target}: none to move toward it")
        x = images[pick[:n].to(images.device)]
        return x, self.edit(x, self.attribute_direction(fit_images, positive), scales, steps)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, z, steps: int = 20) -> torch.Tensor:
        """DDIM inversion: x0 and z (a code, or a function of t: see _denoise_fn) to x_T."""
        return samplers.ddim_invert(self._denoise_fn(z), images, self.model.process, steps,
                                    self.model.sampling_prediction)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, steps: int = 20, invert: bool = True, seed: int | None = 0):
        """Encode, (optionally) invert to x_T, decode with deterministic DDIM.
        Returns (reconstructions, {'mse', 'psnr'}) with images in [-1, 1] (PSNR on a [0, 1] scale).
        A time-dependent encoder is read at every step's own t, as diffae eval does."""
        images = self._as_images(images)
        z = self._codes_at(images)
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
        z_at = self._codes_at(pair)
        x_T = self.invert(pair, z_at, steps)
        ws = torch.linspace(0, 1, n, device=self.device)[:, None]
        xs = torch.cat([slerp(x_T[:1], x_T[1:], float(w)) for w in ws])
        between = self._denoise_fn(lambda t: torch.lerp(z_at(t)[:1], z_at(t)[1:], ws))  # (n, z_dim) per t
        return samplers.sample(between, xs, self.model.process, steps, "ddim", self.model.sampling_prediction,
                               clip=0.0).clamp(-1, 1)
