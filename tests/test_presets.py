"""The seed papers' methods as presets: each validates, builds, trains a step and encodes."""
import pytest
import torch

from diffae.config import METHOD_PRESETS, PRESETS, Config, get_preset, preset_doc
from diffae.data import synthetic
from diffae.engine.pipeline import Pipeline
from diffae.nn.autoencoder import DiffusionAutoencoder

MICRO = ["model.dim=32", "model.depth=2", "model.heads=2", "model.patch=4", "encoder.dim=32", "encoder.depth=1",
         "encoder.heads=2", "encoder.patch=7"]


def test_method_presets_are_registered_and_documented():
    assert set(METHOD_PRESETS) <= set(PRESETS)
    for name in METHOD_PRESETS:
        cfg = get_preset(name)
        assert Config.from_dict(cfg.to_dict()) == cfg
        assert (cfg.model.channels, cfg.model.img_size) == (1, 28)
        assert cfg.model.dim <= get_preset("dae-s").model.dim and cfg.model.depth <= get_preset("dae-s").model.depth
        doc = preset_doc(name)
        assert "Taken from the paper" in doc and ("differs" in doc or "Not established" in doc), name


def test_method_presets_make_the_papers_choices():
    c = get_preset("diffae")
    assert (c.encoder.kind, c.model.conditioning, c.diffusion.prediction, c.diffusion.process) == \
        ("static", "scale", "eps", "vp-linear")
    for name, latent in (("drl", "deterministic"), ("vdrl", "gaussian")):
        c = get_preset(name)
        assert (c.diffusion.process, c.diffusion.prediction, c.encoder.kind, c.encoder.latent) == \
            ("ve", "score", "time", latent)
        assert (c.diffusion.sigma_min, c.diffusion.sigma_max) == (0.01, 50.0)
    assert get_preset("drl").encoder.l1_weight > 0 and get_preset("vdrl").encoder.kl_weight > 0
    # the noise range is a parameter: uniform-sigma stresses high noise (DRL's detail control)
    get_preset("drl").override(["diffusion.t_sampling=uniform-sigma"])
    c = get_preset("mldae")
    assert (c.encoder.kind, c.model.conditioning) == ("time", "adaln")
    c = get_preset("dmz")
    assert (c.encoder.latent, c.model.conditioning, c.encoder.z_dim) == ("bernoulli", "cross-attn", 64)


@pytest.mark.parametrize("name", METHOD_PRESETS)
def test_method_preset_builds_trains_and_encodes(name):
    with torch.device("meta"):  # the real size builds (on the meta device: no memory, no init time)
        full = DiffusionAutoencoder(get_preset(name))
    assert sum(p.numel() for p in full.parameters()) < 60e6
    del full
    cfg = get_preset(name).override(MICRO + ["encoder.z_dim=8"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg)
    x = synthetic(n=4).images
    out = model.loss(x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.encode(x).shape == (4, 8)
    if cfg.encoder.kind == "time":
        assert model.encode(x, t=[0.2, 0.8]).shape == (4, 16)
    if name == "dmz":  # no latent prior: z from the Bernoulli prior
        img = Pipeline(model).sample(2, steps=2)
        assert img.shape == (2, 1, 28, 28) and torch.isfinite(img).all()
