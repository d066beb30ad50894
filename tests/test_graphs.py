"""CUDA-graph sampling gives the eager images for the same seed (GPU), and buckets are sane (CPU)."""
import pytest
import torch

from diffae.config import get_preset
from diffae.diffusion import samplers
from diffae.engine.graphs import BUCKETS, bucket_for
from diffae.engine.pipeline import Pipeline
from diffae.errors import ConfigError
from diffae.nn.autoencoder import DiffusionAutoencoder
from diffae.nn.latent_prior import LatentPrior


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 64, 65, 256, 1000)] == [1, 2, 4, 64, 128, 256, 256]
    assert list(BUCKETS) == sorted(BUCKETS)


def _pipe(device, **kw):
    torch.manual_seed(0)
    model = DiffusionAutoencoder(get_preset("dae-tiny")).to(device)
    with torch.no_grad():  # leave the zero-initialised identity so the output depends on everything
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prior = LatentPrior(model.cfg.encoder.z_dim, 64, 2).to(device)
    return Pipeline(model, prior, **kw)


def test_same_seed_same_images_eager():
    pipe = _pipe("cpu")
    a = pipe.sample(3, steps=3, sampler="ddpm", seed=5, prior_steps=3)
    b = pipe.sample(3, steps=3, sampler="ddpm", seed=5, prior_steps=3)
    c = pipe.sample(3, steps=3, sampler="ddpm", seed=6, prior_steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp2m"])
def test_conditioning_computed_before_the_loop_gives_the_stepwise_images(sampler):
    """The pipeline conditions every step of a schedule in one call before the loop (heun's second
    evaluations included); the images must be those of conditioning step by step."""
    pipe = _pipe("cpu")
    calls = []
    condition = pipe.eager_condition
    pipe.eager_condition = lambda t, z: calls.append(t.shape[0]) or condition(t, z)
    process, steps = pipe.model.process, 4
    z = torch.randn(2, pipe.cfg.encoder.z_dim)
    m = pipe.cfg.model
    x = torch.randn(2, m.channels, m.img_size, m.img_size)
    points = samplers.schedule(process, steps)
    batched = samplers.sample(pipe._denoise_fn(z, points=points), x, process, steps, sampler, points=points)
    assert calls == [2 * steps]  # one call for the whole schedule, none inside the loop
    stepwise = samplers.sample(pipe._denoise_fn(z), x, process, steps, sampler)
    torch.testing.assert_close(batched, stepwise, rtol=1e-4, atol=1e-4)  # GEMM blocking differs with M


def test_cuda_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="CUDA"):
        _pipe("cpu", cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun", "dpmpp2m"])
@pytest.mark.parametrize("n", [1, 5])
def test_graph_replay_matches_eager(sampler, n):
    eager = _pipe("cuda")
    graphed = _pipe("cuda", cuda_graph=True)
    a = eager.sample(n, steps=4, sampler=sampler, seed=1, prior_steps=4)
    b = graphed.sample(n, steps=4, sampler=sampler, seed=1, prior_steps=4)   # captures
    c = graphed.sample(n, steps=4, sampler=sampler, seed=1, prior_steps=4)   # replays
    d = graphed.sample(n, steps=4, sampler=sampler, seed=2, prior_steps=4)
    diff = (a - c).abs().max().item()
    print(f"max |eager - graph| = {diff:.2e} ({sampler}, n={n})")
    assert diff <= 1e-4 and torch.equal(b, c) and not torch.equal(c, d)
    z = torch.randn(n, eager.cfg.encoder.z_dim, device="cuda")
    assert (eager.sample(n, steps=3, z=z) - graphed.sample(n, steps=3, z=z)).abs().max() <= 1e-4
