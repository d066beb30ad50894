import pytest

from diffae.config import PRESETS, Config, get_preset
from diffae.errors import ConfigError


def test_presets_validate_and_round_trip():
    for name in PRESETS:
        cfg = get_preset(name)
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_dae_b_matches_the_yardstick_shapes():
    cfg = get_preset("dae-b")
    assert (cfg.model.dim, cfg.model.depth, cfg.model.heads, cfg.model.patch) == (768, 12, 12, 2)
    assert (cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.encoder.patch) == (512, 6, 8, 4)
    assert cfg.encoder.z_dim == 512


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*dae-tiny"):
        get_preset("nope")


@pytest.mark.parametrize("assignment, message", [
    ("model.conditioning=film", "unknown model.conditioning 'film'"),
    ("model.nonsense=1", "unknown config field 'model.nonsense'"),
    ("train.steps=many", "not a valid int"),
    ("steps=5", "section.field=value"),
    ("model.patch=3", "does not divide"),
    ("diffusion.t_max=0.0", "t_min < diffusion.t_max"),
    ("diffusion.prediction=score", "needs diffusion.process='ve'"),
    ("train.data_parallel=zero3", "unknown train.data_parallel 'zero3'"),
])
def test_bad_overrides_are_named(assignment, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("dae-tiny").override([assignment])


def test_override_parses_types():
    cfg = get_preset("dae-tiny").override(["train.lr=0.5", "train.compile=true", "model.depth=3"])
    assert cfg.train.lr == 0.5 and cfg.train.compile is True and cfg.model.depth == 3
