"""The encoder's training views (diffae/nn/views.py): the maps stay inside the image with the
asked-for areas, area 1 is the image itself (mirrored when asked), a known crop matches its
pixels, and the loss feeds the encoder the view while the denoiser's target stays x0."""
import pytest
import torch
import torch.nn.functional as F

from diffae.config import get_preset
from diffae.errors import ConfigError
from diffae.nn.autoencoder import DiffusionAutoencoder
from diffae.nn.views import apply_views, draw_views


def test_views_stay_inside_the_image_with_their_areas():
    theta = draw_views(20000, 0.4, True, generator=torch.Generator().manual_seed(0))
    sx, sy, tx, ty = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    area = sx.abs() * sy
    assert area.min() >= 0.4 - 1e-6 and area.max() <= 1 + 1e-6
    assert area.min() < 0.41 and area.max() > 0.99            # the whole range is drawn
    assert bool((tx.abs() + sx.abs() <= 1 + 1e-6).all() and (ty.abs() + sy <= 1 + 1e-6).all())
    aspect = sx.abs() / sy
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert 0.45 < (sx < 0).float().mean() < 0.55               # mirrored half the time
    assert bool((theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all())


@pytest.mark.parametrize("flip", [False, True])
def test_full_area_is_the_image_itself(flip):
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    theta = draw_views(8, 1.0, flip, generator=torch.Generator().manual_seed(1))
    y = apply_views(x, theta)
    mirrored = theta[:, 0, 0] < 0
    assert bool(mirrored.any()) == flip
    want = torch.where(mirrored.view(-1, 1, 1, 1), x.flip(-1), x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)


def test_a_known_crop_is_those_pixels_resized():
    """The upper-left quarter (half-sizes 0.5, centre at -0.5) is x[:, :, :14, :14] scaled by 2:
    the same as bilinear interpolation of that block (both sample pixel centres, half-pixel aligned)."""
    x = torch.randn(2, 3, 28, 28)
    theta = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]]).expand(2, 2, 3)
    got = apply_views(x, theta)
    block = x[:, :, :14, :14]
    want = F.interpolate(block, size=(28, 28), mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(1, 27), slice(1, 27))  # the block's own border differs
    torch.testing.assert_close(got[inner], want[inner], rtol=0, atol=1e-5)


def test_the_encoder_sees_the_view_and_the_target_stays_x0():
    cfg = get_preset("dae-tiny").override(["encoder.view_min_area=0.3", "encoder.view_flip=true"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg)
    with torch.no_grad():  # zero-initialised gates would hide z from the loss
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    noise = model.draw_noise(4, "cpu", torch.Generator().manual_seed(2))
    seen = []
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    loss = model.loss(x0, noise=noise).loss
    torch.testing.assert_close(seen[0], apply_views(x0, noise["view"]))
    assert not torch.allclose(seen[0], x0, atol=1e-2)
    # with the view replaced by the identity, the same noise gives the plain loss on x0
    plain = dict(noise, view=torch.eye(2, 3).expand(4, 2, 3))
    no_view = {k: v for k, v in noise.items() if k != "view"}
    torch.testing.assert_close(model.loss(x0, noise=plain).loss, model.loss(x0, noise=no_view).loss,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, model.loss(x0, noise=no_view).loss)


@pytest.mark.parametrize("area", ["0", "1.5", "-0.1"])
def test_bad_view_area_is_refused(area):
    with pytest.raises(ConfigError, match="view_min_area"):
        get_preset("dae-tiny").override([f"encoder.view_min_area={area}"]).validate()
