"""DiffAE's editing: an attribute's direction in z (a logistic regression on standardised codes) and
decoding moved codes from each image's own DDIM-inverted x_T."""
import pytest
import torch

from diffae.data import synthetic
from diffae.engine.pipeline import Pipeline
from diffae.engine.trainer import Trainer
from diffae.errors import InputError


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffae.config import get_preset
    cfg = get_preset("dae-tiny").override(["model.dim=32", "model.depth=2", "model.heads=2", "model.patch=4",
                                           "encoder.dim=32", "encoder.depth=1", "encoder.heads=2",
                                           "encoder.patch=7", "encoder.z_dim=8", "train.batch_size=16",
                                           "train.warmup_steps=2", "train.lr=2e-3"])
    out = tmp_path_factory.mktemp("edit")
    # trained a little: at initialisation AdaLN-Zero's zero gates make the output ignore z
    Trainer(cfg, synthetic(n=64), out, "cpu", quiet=True).fit(steps=20)
    return Pipeline.from_checkpoint(out / "last.pt", "cpu")


def test_edit_at_scale_zero_is_the_reconstruction_and_other_scales_move_the_image(pipe):
    x = synthetic(n=3, seed=1).images
    d = torch.randn(8, generator=torch.Generator().manual_seed(0))
    edits = pipe.edit(x, d, scales=(0.0, 1.0), steps=4)
    assert edits.shape == (2, 3, 1, 28, 28)
    rec, _ = pipe.reconstruct(x, steps=4)
    torch.testing.assert_close(edits[0], rec, rtol=0, atol=1e-5)
    assert (edits[1] - edits[0]).abs().mean() > 1e-3


def test_attribute_direction_finds_the_axis_that_separates_the_groups(pipe, monkeypatch):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 8, generator=g) * torch.linspace(0.5, 4.0, 8)  # dimensions of unequal spread
    monkeypatch.setattr(pipe, "codes", lambda images, batch_size=512: z)
    positive = z[:, 2] > 0.5 * z[:, 2].std()
    d = pipe.attribute_direction(torch.zeros(400, 1, 28, 28), positive)
    unit = d / z.std(0) / 8 ** 0.5  # standardised, and per size sqrt(z_dim): a unit vector along dimension 2
    torch.testing.assert_close(unit.norm(), torch.tensor(1.0))
    assert unit.abs().argmax() == 2 and unit[2] > 0.9


@pytest.mark.parametrize("positive, message", [(torch.ones(4), "bool tensor"), (torch.ones(3, dtype=torch.bool), "shape"),
                                               (torch.ones(4, dtype=torch.bool), "not all")])
def test_attribute_direction_refuses_a_bad_grouping(pipe, positive, message):
    with pytest.raises(InputError, match=message):
        pipe.attribute_direction(synthetic(n=4).images, positive)


def test_edit_refuses_a_bad_direction_or_no_scale(pipe):
    x = synthetic(n=2).images
    with pytest.raises(InputError, match=r"\(8,\)"):
        pipe.edit(x, torch.ones(7))
    with pytest.raises(InputError, match="finite"):
        pipe.edit(x, torch.full((8,), float("nan")))
    with pytest.raises(InputError, match="at least one scale"):
        pipe.edit(x, torch.ones(8), scales=())
