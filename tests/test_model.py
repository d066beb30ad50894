import pytest
import torch

from diffae.config import PRESETS, get_preset
from diffae.errors import InputError
from diffae.nn.autoencoder import DEFAULT_CODE_T, DiffusionAutoencoder
from diffae.nn.layers import run_blocks


def _images(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    return torch.rand(b, m.channels, m.img_size, m.img_size, generator=g) * 2 - 1


def _leave_identity_init(model):
    # AdaLN-Zero starts every block (and the output layer) at zero, which blocks gradients to z
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_denoises_and_encodes_with_the_right_shapes(preset):
    cfg = get_preset(preset)
    model = DiffusionAutoencoder(cfg).eval()
    x = _images(cfg, b=1)
    with torch.no_grad():
        z = model.encode(x)
        out = model.denoise(x, torch.rand(1), z)
    assert z.shape == (1, cfg.encoder.z_dim)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("conditioning", ["adaln", "scale", "cross-attn"])
@pytest.mark.parametrize("latent, kind", [("deterministic", "static"), ("gaussian", "time"), ("bernoulli", "static")])
def test_conditioning_modes_and_latents(micro_cfg, conditioning, latent, kind):
    cfg = micro_cfg.override([f"model.conditioning={conditioning}", f"encoder.latent={latent}",
                              f"encoder.kind={kind}", "encoder.kl_weight=1e-3", "model.img_size=28",
                              "model.channels=3"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg)
    _leave_identity_init(model)
    out = model.loss(_images(cfg, b=4))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # the code must reach the denoiser: every encoder parameter group gets a gradient
    assert model.encoder.head.proj.weight.grad.abs().sum() > 0
    assert model.encode(_images(cfg, b=3)).shape == (3, cfg.encoder.z_dim)


def test_z_changes_the_output(micro_cfg):
    torch.manual_seed(0)
    model = DiffusionAutoencoder(micro_cfg)
    _leave_identity_init(model)
    x, t = _images(micro_cfg, b=2), torch.full((2,), 0.5)
    z = torch.randn(2, micro_cfg.encoder.z_dim)
    with torch.no_grad():
        assert (model.denoise(x, t, z) - model.denoise(x, t, z + 1)).abs().max() > 1e-4


def test_static_encoder_reads_checkpoints_of_the_constant_and_projection_layout(micro_cfg):
    # diffae <= 0.1.0 stored a static encoder's modulations as W silu(const) + b per block
    model = DiffusionAutoencoder(micro_cfg)
    assert all(block.ada is None for block in model.encoder.blocks)
    old = {k: v for k, v in model.state_dict().items() if k != "encoder.mods"}
    g = torch.Generator().manual_seed(3)
    dim, depth = micro_cfg.encoder.dim, micro_cfg.encoder.depth
    old["encoder.const"] = torch.randn(dim, generator=g)
    for i in range(depth):
        old[f"encoder.blocks.{i}.ada.weight"] = torch.randn(6 * dim, dim, generator=g)
        old[f"encoder.blocks.{i}.ada.bias"] = torch.randn(6 * dim, generator=g)
    fresh = DiffusionAutoencoder(micro_cfg)
    fresh.load_state_dict(old)
    s = torch.nn.functional.silu(old["encoder.const"])
    for i in range(depth):
        want = old[f"encoder.blocks.{i}.ada.weight"] @ s + old[f"encoder.blocks.{i}.ada.bias"]
        torch.testing.assert_close(fresh.encoder.mods[i], want)


def test_seeded_loss_is_deterministic(micro_cfg):
    def run():
        torch.manual_seed(123)
        model = DiffusionAutoencoder(micro_cfg)
        return model.loss(_images(micro_cfg, b=4), generator=torch.Generator().manual_seed(7)).loss
    assert torch.equal(run(), run())


def test_multi_level_encoding_concatenates(micro_cfg):
    cfg = micro_cfg.override(["encoder.kind=time"])
    model = DiffusionAutoencoder(cfg).eval()
    x = _images(cfg, b=2)
    assert model.encode(x, [0.1, 0.5, 0.9]).shape == (2, 3 * cfg.encoder.z_dim)
    static = DiffusionAutoencoder(micro_cfg)
    with pytest.raises(InputError, match="time-dependent"):
        static.encode(x, [0.1, 0.5])


@pytest.mark.parametrize("kind", ["time", "static"])
def test_pooled_features_are_what_the_code_is_read_from(micro_cfg, kind):
    cfg = micro_cfg.override([f"encoder.kind={kind}"])
    model = DiffusionAutoencoder(cfg).eval()
    torch.nn.init.normal_(model.encoder.head.proj.weight)  # not the zero init: the check could not fail
    x = _images(cfg, b=3)
    h = model.encode(x, 0.3 if kind == "time" else None, pooled=True)
    assert h.shape == (3, cfg.encoder.dim)
    z = model.encode(x, 0.3 if kind == "time" else None)
    torch.testing.assert_close(model.encoder.head(h).embedding, z)
    if kind == "time":  # t=None reads the default code t, as the code does
        torch.testing.assert_close(model.encode(x, pooled=True), model.encode(x, DEFAULT_CODE_T, pooled=True))
        assert model.encode(x, [0.1, 0.9], pooled=True).shape == (3, 2 * cfg.encoder.dim)


@pytest.mark.parametrize("conditioning", ["adaln", "scale", "cross-attn"])
def test_denoiser_features_are_the_residual_stream_of_the_noised_image_under_its_code(micro_cfg, conditioning):
    cfg = micro_cfg.override([f"model.conditioning={conditioning}", "model.depth=3", "encoder.kind=time"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg).eval()
    _leave_identity_init(model)
    x, t = _images(cfg, b=3), 0.3
    feats = model.denoiser_features(x, t, [0, 2], torch.Generator().manual_seed(5))
    assert [f.shape for f in feats] == [(3, cfg.model.dim)] * 2
    # by hand: the same noise, the code at t, the blocks run one by one
    tt = torch.full((3,), t)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    alpha, sigma = model.process.alpha_sigma(tt)
    x_t = alpha.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * eps
    dit = model.denoiser
    with torch.no_grad():
        cond = dit.condition(tt, model.encode_latent(x, tt).z)[0]
        want = []
        for i in range(3):  # each prefix of the blocks run alone
            mods = [*cond.mods[:i + 1], None]
            stream_i, _ = run_blocks(dit.blocks[:i + 1], False, dit.x_embed(x_t), mods,
                                     None if cond.kv is None else cond.kv[:i + 1])
            want.append(stream_i.mean(1))
    torch.testing.assert_close(feats[0], want[0])
    torch.testing.assert_close(feats[1], want[2])
    # the last block's stream is what the final layer reads in the full denoiser
    with torch.no_grad():
        full, _ = run_blocks(dit.blocks, False, dit.x_embed(x_t), cond.mods, cond.kv)
    torch.testing.assert_close(feats[1], full.mean(1))
    # seeded: the same generator gives the same features, t and the code both matter
    again = model.denoiser_features(x, t, [2], torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(again, feats[1], rtol=0, atol=0)
    assert (model.denoiser_features(x, 0.6, [2], torch.Generator().manual_seed(5))[0] - feats[1]).abs().max() > 1e-4
    with torch.no_grad():
        model.encoder.head.proj.bias.add_(1.0)
    assert (model.denoiser_features(x, t, [2], torch.Generator().manual_seed(5))[0] - feats[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="blocks must be indices"):
        model.denoiser_features(x, t, [3])
    with pytest.raises(InputError, match="t must be in"):
        model.denoiser_features(x, 1.5, [0])


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 28, 28), r"must be \(B, 1, 28, 28\)"),
    (torch.zeros(2, 1, 32, 32), r"must be \(B, 1, 28, 28\)"),
    (torch.zeros(1, 28, 28), r"must be \(B, 1, 28, 28\)"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN or Inf"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.int64), "floating point"),
    (torch.zeros(0, 1, 28, 28), "empty batch"),
])
def test_bad_images_are_named(micro_cfg, bad, message):
    model = DiffusionAutoencoder(micro_cfg)
    with pytest.raises(InputError, match=message):
        model.encode(bad)


@pytest.mark.parametrize("conditioning", ["adaln", "scale", "cross-attn"])
def test_inference_copy_gives_the_denoisers_output(micro_cfg, conditioning):
    cfg = micro_cfg.override([f"model.conditioning={conditioning}"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg)
    _leave_identity_init(model)
    net = model.denoiser.inference_copy()
    assert net.stacked_ada is not None and all(b.ada is None for b in net.blocks)
    x, t = _images(cfg, b=3), torch.tensor([0.1, 0.5, 0.9])
    z = torch.randn(3, cfg.encoder.z_dim)
    with torch.no_grad():
        want, got = model.denoise(x, t, z), model.denoise(x, t, z, net)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a copy: training the model on does not reach it, and it has no gradients to take
    with torch.no_grad():
        model.denoiser.blocks[0].ada.weight.add_(1.0)
        assert torch.equal(model.denoise(x, t, z, net), got)
    assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("conditioning", ["adaln", "scale", "cross-attn"])
def test_conditioning_of_many_steps_is_each_steps_own(micro_cfg, conditioning):
    """Sampling conditions all its steps in one batch (DiT.condition over S*B times); each step's
    share must be what that step alone computes, and give the same output."""
    cfg = micro_cfg.override([f"model.conditioning={conditioning}"])
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg)
    _leave_identity_init(model)
    net = model.denoiser.inference_copy()
    B, times = 3, [0.9, 0.55, 0.2, 0.05]
    x, z = _images(cfg, b=B), torch.randn(B, cfg.encoder.z_dim)
    with torch.no_grad():
        together = net.condition(torch.cat([torch.full((B,), t) for t in times]), z)
        assert len(together) == len(times)
        for t, cond in zip(times, together):
            tt = torch.full((B,), t)
            (alone,) = net.condition(tt, z)
            for a, b in zip(cond.mods, alone.mods):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            assert (cond.kv is None) == (conditioning != "cross-attn")
            torch.testing.assert_close(model.denoise(x, tt, None, net, cond), model.denoise(x, tt, z),
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="S\\*B"):
        net.condition(torch.rand(B + 1), z)


def test_fold_z_scale_is_the_multiplicative_scale():
    from diffae.nn.dit import fold_z_scale
    torch.manual_seed(0)
    x, mod, zs = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 2, 8)
    folded = fold_z_scale(mod, zs)
    ln = torch.nn.functional.layer_norm(x, (8,))
    for sub in range(2):  # sublayer: rows (shift, scale, gate) at 3 * sub
        shift, scale, gate = mod[:, 3 * sub:3 * sub + 3].unbind(1)
        want = (1 + zs[:, sub, None]) * (ln * (1 + scale[:, None]) + shift[:, None])
        got = ln * (1 + folded[:, 3 * sub + 1, None]) + folded[:, 3 * sub, None]
        torch.testing.assert_close(got, want)
        assert torch.equal(folded[:, 3 * sub + 2], gate)  # gates are not scaled


@pytest.mark.gpu
def test_inference_copy_with_bf16_weights_matches_autocast():
    """bf16-stored weights are what autocast would cast them to, and the GELU epilogue rounds once
    where autocast rounds twice: against fp32, the copy's error is at most autocast's own."""
    cfg = get_preset("dae-tiny")
    torch.manual_seed(0)
    model = DiffusionAutoencoder(cfg).cuda()
    _leave_identity_init(model)
    net = model.denoiser.inference_copy(torch.bfloat16)
    assert net.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    x = torch.rand(8, cfg.model.channels, cfg.model.img_size, cfg.model.img_size, device="cuda") * 2 - 1
    t, z = torch.rand(8, device="cuda"), torch.randn(8, cfg.encoder.z_dim, device="cuda")
    with torch.no_grad():
        exact = model.denoise(x, t, z)
        with torch.autocast("cuda", torch.bfloat16):
            want, got = model.denoise(x, t, z).float(), model.denoise(x, t, z, net).float()
    err_copy, err_autocast = ((got - exact).abs().max().item(), (want - exact).abs().max().item())
    print(f"max error against fp32: bf16 copy {err_copy:.2e}, autocast {err_autocast:.2e}, "
          f"output scale {exact.abs().max().item():.2f}")
    assert err_copy <= 1.5 * err_autocast + 1e-3 * exact.abs().max().item()
