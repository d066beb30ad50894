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
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    augment_flip: bool = False


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
        if e.latent == "bernoulli" and m.conditioning != "cross-attn" and e.z_dim > 4096:
            raise ConfigError("encoder.z_dim too large for a Bernoulli code")
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


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")


def _parse_like(old, raw: str, key: str):
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
    }


PRESETS = tuple(_registry())


def get_preset(name: str) -> Config:
    presets = _registry()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name].validate()
