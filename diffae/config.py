"""Configuration dataclasses and the preset registry.

A Config is plain data: it round-trips through JSON (stored in every checkpoint) and every field
can be overridden from the CLI with --set section.field=value.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ConfigError

CONDITIONINGS = ("adaln", "scale", "cross-attn")
ENCODERS = ("static", "time")
LATENTS = ("deterministic", "gaussian", "bernoulli")
PROCESSES = ("vp-cosine", "vp-linear", "ve")
PREDICTIONS = ("eps", "v", "x0", "score")
WEIGHTINGS = ("none", "min-snr", "sigma2")
T_SAMPLINGS = ("uniform", "logit-normal", "uniform-sigma")
# torch.compile modes for the train step; "reduce-overhead" replays forward and backward as CUDA
# graphs, for small presets whose step the host's kernel launches would otherwise bound; "auto"
# picks it where it is measured and tested (see resolve_compile_mode)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
DATA_PARALLEL = ("ddp", "fsdp")


@dataclass
class ModelConfig:
    """The DiT denoiser D(x_t, t, z)."""
    img_size: int = 28
    channels: int = 1
    patch: int = 2
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    conditioning: str = "adaln"   # how z enters: adaln | scale | cross-attn
    z_tokens: int = 4             # cross-attn: z becomes this many key/value tokens
    qk_norm: bool = False
    # recompute each transformer block's activations in the backward pass: less memory, ~1/3 more
    # compute; not part of the architecture (a run may resume with it switched)
    activation_checkpointing: bool = False

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch) ** 2


@dataclass
class EncoderConfig:
    """The ViT encoder E(x0) ("static") or E(x0, t) ("time") and its latent head."""
    kind: str = "static"
    patch: int = 4
    dim: int = 512
    depth: int = 6
    heads: int = 8
    z_dim: int = 512
    latent: str = "deterministic"  # deterministic | gaussian (KL) | bernoulli (straight-through)
    l1_weight: float = 0.0         # deterministic code: L1 penalty on z
    kl_weight: float = 0.0         # gaussian code: KL(q(z|x) || N(0, I)) weight
    # training only: the encoder sees a random crop of x0 (area in [view_min_area, 1], resized back;
    # 1.0: x0 itself), mirrored at random when view_flip, while the denoiser denoises x0 (nn/views.py)
    view_min_area: float = 1.0
    view_flip: bool = False


@dataclass
class DiffusionConfig:
    process: str = "vp-cosine"
    # v keeps the x0 estimate bounded at high noise, where eps amplifies errors by sigma/alpha:
    # undertrained and few-step models give coherent images sooner (measured on dae-tiny)
    prediction: str = "v"
    weighting: str = "none"
    t_sampling: str = "uniform"
    t_min: float = 0.0            # the training noise range [t_min, t_max] decides what z keeps
    t_max: float = 1.0
    sigma_min: float = 0.01       # VE only
    sigma_max: float = 50.0
    min_snr_gamma: float = 5.0


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    batch_size: int = 128
    steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = True             # autocast on CUDA (CPU stays fp32)
    compile: bool | str = "auto"  # torch.compile the loss: "auto" (on for CUDA, off for CPU), true, false
    compile_mode: str = "auto"  # one of COMPILE_MODES
    grad_accum: int = 1           # micro-batches per optimizer step; the step still sees batch_size images
    # under torchrun: "ddp" (every rank holds the whole model, optimizer and EMA) or "fsdp" (FSDP2:
    # each rank holds 1 / world size of them, gathered per block, for models that do not fit)
    data_parallel: str = "ddp"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    augment_flip: bool = False
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses/gradients in a row (steps skipped)
    # wall-clock budget of one fit() (one process's training; a resumed run gets it afresh): past it
    # training stops and saves as at train.steps; 0: no limit
    max_minutes: float = 0.0
    # time the attention kernels' block sizes at the first call of each shape.  Off: at training
    # shapes the fixed configs are the tuned picks (dae-b on an H200: 2604 img/s fixed, 2602 tuned)
    # and tuning adds 13 s to the first compile (55.5 against 68.7 s); sampling keeps tuning
    attn_autotune: bool = False


@dataclass
class Config:
    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        m, e, d = self.model, self.encoder, self.diffusion
        _choice("model.conditioning", m.conditioning, CONDITIONINGS)
        _choice("encoder.kind", e.kind, ENCODERS)
        _choice("encoder.latent", e.latent, LATENTS)
        _choice("diffusion.process", d.process, PROCESSES)
        _choice("diffusion.prediction", d.prediction, PREDICTIONS)
        _choice("diffusion.weighting", d.weighting, WEIGHTINGS)
        _choice("diffusion.t_sampling", d.t_sampling, T_SAMPLINGS)
        for name, size, patch in (("model", m.img_size, m.patch), ("encoder", m.img_size, e.patch)):
            if size % patch:
                raise ConfigError(f"{name}.patch={patch} does not divide model.img_size={size}")
        for name, dim, heads in (("model", m.dim, m.heads), ("encoder", e.dim, e.heads)):
            if dim % heads:
                raise ConfigError(f"{name}.dim={dim} is not divisible by {name}.heads={heads}")
        if not 0.0 <= d.t_min < d.t_max <= 1.0:
            raise ConfigError(f"need 0 <= diffusion.t_min < diffusion.t_max <= 1, got {d.t_min}, {d.t_max}")
        if d.process == "ve" and d.prediction in ("v", "x0"):
            raise ConfigError("the VE process supports prediction 'eps' or 'score'")
        if d.process != "ve" and d.prediction == "score":
            raise ConfigError("prediction 'score' needs diffusion.process='ve'")
        if not 0.0 < e.view_min_area <= 1.0:
            raise ConfigError(f"encoder.view_min_area must be in (0, 1], got {e.view_min_area}")
        if e.latent == "bernoulli" and m.conditioning != "cross-attn" and e.z_dim > 4096:
            raise ConfigError("encoder.z_dim too large for a Bernoulli code")
        t = self.train
        t.compile = parse_compile(t.compile)
        _choice("train.compile_mode", t.compile_mode, COMPILE_MODES)
        _choice("train.data_parallel", t.data_parallel, DATA_PARALLEL)
        if t.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {t.grad_accum}")
        if not t.max_minutes >= 0:  # also refuses NaN
            raise ConfigError(f"train.max_minutes must be >= 0 (0: no limit), got {t.max_minutes}")
        if t.batch_size < 1 or t.batch_size % t.grad_accum:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        try:
            return cls(preset=data.get("preset", "custom"),
                       model=ModelConfig(**data.get("model", {})),
                       encoder=EncoderConfig(**data.get("encoder", {})),
                       diffusion=DiffusionConfig(**data.get("diffusion", {})),
                       train=TrainConfig(**data.get("train", {}))).validate()
        except TypeError as exc:
            raise ConfigError(f"config has an unknown field: {exc}") from None

    def override(self, assignments: list[str]) -> "Config":
        """Apply 'section.field=value' strings (values parsed as the field's type)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, name = key.partition(".")
            if not sep or not dot or section not in data or not isinstance(data[section], dict):
                raise ConfigError(f"--set expects section.field=value, got {item!r}")
            if name not in data[section]:
                raise ConfigError(f"unknown config field {key!r}; fields of {section}: "
                                  f"{', '.join(sorted(data[section]))}")
            data[section][name] = _parse_like(data[section][name], raw, key)
        return Config.from_dict(data)


def parse_compile(value) -> bool | str:
    """train.compile as "auto", True or False; configs written before "auto" existed hold a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "true", "false", "1", "0", "on", "off"):
        return "auto" if text == "auto" else text in ("true", "1", "on")
    raise ConfigError(f"train.compile={value!r} is not valid; use auto, true or false")


def resolve_compile(value, device_type: str) -> bool:
    """Whether to compile on this device: "auto" compiles on CUDA only, where it pays off; on the
    CPU Inductor's C++ build costs more than the short runs there save."""
    value = parse_compile(value)
    return device_type == "cuda" if value == "auto" else value


def resolve_compile_mode(mode: str, device_type: str, distributed: bool, grad_accum: int) -> str:
    """The torch.compile mode of the train step.  "auto" replays it as CUDA graphs on one CUDA
    process without gradient accumulation (H200: mldae 5140 -> 8887 img/s, dae-b 2721 -> 2754,
    the same peak memory and compile time), and keeps the plain mode elsewhere: under DDP and
    across micro-batches the graphs are neither measured nor tested."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device_type == "cuda" and not distributed and grad_accum == 1 else "default"


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")


def _parse_like(old, raw: str, key: str):
    if key == "train.compile":  # tri-state: auto | true | false
        return parse_compile(raw)
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        return type(old)(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {type(old).__name__}") from None


def _preset(name: str, *, model: dict | None = None, encoder: dict | None = None,
            diffusion: dict | None = None, train: dict | None = None) -> Config:
    return Config(preset=name, model=ModelConfig(**(model or {})), encoder=EncoderConfig(**(encoder or {})),
                  diffusion=DiffusionConfig(**(diffusion or {})), train=TrainConfig(**(train or {})))


# --- the methods of the seed papers, as presets of the one framework ----------------------------
# All five are sized like dae-s (DiT 384 wide, 12 deep, patch 2; ViT encoder 256 wide, 4 deep) for
# Fashion-MNIST 28x28x1, and share one training recipe meant to fit in about 30 minutes on one H100.
# What each paper establishes is in /work/shared/METHODS.md; where a paper leaves a detail open, the
# docstring says so and names the choice made here.
_METHOD_MODEL = dict(dim=384, depth=12, heads=6, patch=2)
_METHOD_ENCODER = dict(dim=256, depth=4, heads=4, patch=4)
_METHOD_TRAIN = dict(batch_size=256, steps=12000, lr=2e-4, warmup_steps=500, ema_decay=0.9995,
                     log_every=100, ckpt_every=2000)


def _method_diffae() -> Config:
    """DiffAE (Preechakul et al., "Diffusion Autoencoders", CVPR 2022).

    Taken from the paper: a static encoder z = E(x0) that never sees t; z enters the denoiser as a
    multiplicative scale beside the timestep's scale-and-shift (`model.conditioning=scale`: AdaLN
    from t, then (1 + W z) per sublayer, DiffAE's AdaGN); eps prediction, unweighted MSE, t uniform;
    the VP process with DDPM's linear betas (`vp-linear`, the continuous-time form of beta 1e-4..0.02
    over T = 1000), chosen over cosine because it is the paper's schedule; encoder and denoiser trained
    end to end with the denoising loss only; afterwards a latent DDIM prior on standardised z with the
    encoder frozen (`diffae train` does this, --prior-steps); DDIM inversion for reconstruction.

    What differs: a DiT denoiser and a ViT encoder instead of the paper's UNet and half-UNet (so AdaGN
    becomes AdaLN); z has 256 dims, not 512 (28x28 images); the latent prior uses diffae's cosine VP
    process, v- instead of eps-prediction (see nn/latent_prior.py: eps was unstable at high noise)
    and a width of min(2048, 4 z_dim), not constant beta 0.008 at width 2048.
    """
    return _preset("diffae", model=dict(_METHOD_MODEL, conditioning="scale"),
                   encoder=dict(_METHOD_ENCODER, kind="static", latent="deterministic", z_dim=256),
                   diffusion=dict(process="vp-linear", prediction="eps", weighting="none", t_sampling="uniform"),
                   train=dict(_METHOD_TRAIN))


def _drl_config(name: str, latent: str, l1_weight: float = 0.0, kl_weight: float = 0.0) -> Config:
    return _preset(name, model=dict(_METHOD_MODEL, conditioning="adaln"),
                   encoder=dict(_METHOD_ENCODER, kind="time", latent=latent, z_dim=128,
                                l1_weight=l1_weight, kl_weight=kl_weight),
                   diffusion=dict(process="ve", prediction="score", weighting="none", t_sampling="uniform",
                                  t_min=1e-5, t_max=1.0, sigma_min=0.01, sigma_max=50.0),
                   train=dict(_METHOD_TRAIN))


def _method_drl() -> Config:
    """DRL (Mittal et al., "Diffusion-Based Representation Learning", ICML 2023), deterministic code.

    Taken from the paper and its code: the VE SDE sigma(t) = 0.01 (50 / 0.01)^t; denoising score
    matching with lambda(t) = sigma(t)^2, i.e. || sigma s + eps ||^2 (`prediction=score`, no extra
    weighting); t ~ U(1e-5, 1); a time-dependent encoder E(x0, t), so each image maps to a curve of
    codes over t; a deterministic code with an L1 penalty; 128 latent dims; Adam lr 2e-4, grad clip 1.

    Detail control: the training noise distribution decides what the code keeps.  The default
    samples t uniformly (log-sigma uniform, as in the paper's code); `--set diffusion.t_sampling=
    uniform-sigma` samples sigma uniformly on [0.01, 50], which stresses high noise (the paper
    reports the code then keeps class rather than stroke detail on MNIST); `diffusion.t_min/t_max`
    restrict the range.

    What differs: a DiT denoiser and a ViT encoder instead of DRL's UNets; the encoder sees t through
    diffae's sinusoidal timestep embedding driving AdaLN, not a Fourier embedding of sigma added as a
    channel bias; z enters through `adaln` (W z added to the timestep embedding, which drives every
    block), the DiT analogue of DRL's latent concatenated to the time embedding as a channel bias;
    the network input is scaled by 1 / sqrt(sigma^2 + 0.25).  The L1 weight is not established by
    METHODS.md: 1e-5 here (on diffae's per-pixel-mean loss), a mild pull, about 1 % of the denoising
    loss for codes of unit scale.  Batch 256 and EMA 0.9995 (paper code: 64 and 0.999) for throughput.
    """
    return _drl_config("drl", "deterministic", l1_weight=1e-5)


def _method_vdrl() -> Config:
    """VDRL (Mittal et al., "Diffusion-Based Representation Learning", ICML 2023), variational code.

    Taken from the paper: everything of `drl` (see its docstring), with a Gaussian code q(z | x0, t)
    (reparameterised in training, its mean as the embedding) and a KL penalty to N(0, I) instead of L1.

    KL weight: the paper's code uses about 1e-5 against a denoising loss summed over pixels; diffae's
    loss is the mean over pixels, so the same balance is 1e-5 / 784 = 1.28e-8 for 28x28x1 images,
    which is what this preset uses.  That KL is weak: the code stays informative and far from N(0, I),
    so unconditional samples should come from a latent prior (trained after, as for every
    non-Bernoulli code) rather than from N(0, I).  `--set encoder.kl_weight=1e-5` pulls the code 784x
    harder towards N(0, I) than the paper's code did.

    What differs: as for `drl` (DiT + ViT, AdaLN conditioning, sinusoidal t embedding, batch 256).
    """
    return _drl_config("vdrl", "gaussian", kl_weight=1e-5 / 784)


def _method_mldae() -> Config:
    """Multi-level denoising autoencoder (Jiang & Cai, "Automated Learning of Semantic Embedding
    Representations for Diffusion Models", 2025; no public code).

    Taken from the paper: a DiT denoiser, and a timestep-dependent encoder E(x0, t) trained across all
    noise levels jointly with the denoiser, so the embedding exists at every noise level; embeddings
    read at any t or over several t: `model.encode(x, t=[...])` concatenates the codes (the
    evaluation reports t = 0.5 and the concatenation over t = 0.25, 0.5, 0.75).

    Not established, chosen here: the loss (diffae's denoising loss, v prediction on vp-cosine, t
    uniform), how the embedding enters the DiT (`adaln`: added to the timestep embedding), "sequentially
    consistent" (no extra term), z of 128 dims per level.
    """
    return _preset("mldae", model=dict(_METHOD_MODEL, conditioning="adaln"),
                   encoder=dict(_METHOD_ENCODER, kind="time", latent="deterministic", z_dim=128),
                   diffusion=dict(process="vp-cosine", prediction="v", weighting="none", t_sampling="uniform"),
                   train=dict(_METHOD_TRAIN))


def _method_dmz() -> Config:
    """DMZ (Proszewska, Malkin, Siddharth, "On Designing Diffusion Autoencoders for Efficient Generation
    and Representation Learning", 2025; no public code).

    Taken from the paper (via public reviews): a binary code z ~ Bernoulli, trained straight-through;
    z enters the denoiser only through cross-attention, as keys/values (`model.conditioning=cross-attn`:
    z becomes 4 extra key/value tokens, and the timestep conditions the blocks alone); the plain
    autoencoder objective, no KL and no learned prior: unconditional samples draw z from the
    Bernoulli(1/2) prior (`diffae train` skips the latent prior for Bernoulli codes); generation aimed at
    few steps; |z| modest: 64 bits here (the reviews: about the label space for generation, larger for
    representations).

    Not established, chosen here: the process and prediction (vp-cosine with v prediction, which keeps
    the x0 estimate bounded at high noise and gives coherent few-step samples sooner), how z relates to
    the forward process (not modelled), a static ViT encoder and DiT instead of the paper's U-Net.
    """
    return _preset("dmz", model=dict(_METHOD_MODEL, conditioning="cross-attn", z_tokens=4),
                   encoder=dict(_METHOD_ENCODER, kind="static", latent="bernoulli", z_dim=64),
                   diffusion=dict(process="vp-cosine", prediction="v", weighting="none", t_sampling="uniform"),
                   train=dict(_METHOD_TRAIN))


METHOD_PRESETS = ("diffae", "drl", "vdrl", "mldae", "dmz")


def preset_doc(name: str) -> str:
    """The docstring of a method preset (paper, what is taken, what differs); '' for the others."""
    fn = {"diffae": _method_diffae, "drl": _method_drl, "vdrl": _method_vdrl, "mldae": _method_mldae,
          "dmz": _method_dmz}.get(name)
    return (fn.__doc__ or "") if fn else ""


def _registry() -> dict[str, Config]:
    tiny_train = dict(batch_size=64, steps=1500, lr=1e-3, warmup_steps=50, ema_decay=0.995,
                      log_every=25, ckpt_every=250)
    return {
        # Seconds per step on a CPU: CI and the default `diffae train`.
        "dae-tiny": _preset("dae-tiny", model=dict(dim=96, depth=4, heads=4, patch=4),
                            encoder=dict(dim=64, depth=2, heads=4, patch=7, z_dim=32), train=tiny_train),
        "dae-s": _preset("dae-s", model=dict(dim=384, depth=12, heads=6),
                         encoder=dict(dim=256, depth=4, heads=4, z_dim=256)),
        # The yardstick's shapes (DiT-B/2 + ViT-512x6), so performance ratios compare like with like.
        "dae-b": _preset("dae-b", model=dict(dim=768, depth=12, heads=12),
                         encoder=dict(dim=512, depth=6, heads=8, z_dim=512)),
        "dae-l": _preset("dae-l", model=dict(dim=1024, depth=24, heads=16),
                         encoder=dict(dim=768, depth=12, heads=12, z_dim=768)),
        # The seed papers' methods (see each function's docstring, or preset_doc(name)).
        "diffae": _method_diffae(),
        "drl": _method_drl(),
        "vdrl": _method_vdrl(),
        "mldae": _method_mldae(),
        "dmz": _method_dmz(),
    }


PRESETS = tuple(_registry())


def get_preset(name: str) -> Config:
    presets = _registry()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name].validate()
