"""CPU-side timings with pytest-benchmark (host overhead of the op layer, sampler loop, a train step).

    python3 -m pytest benchmarks/test_cpu_bench.py --benchmark-enable --benchmark-json=cpu.json
"""
import pytest
import torch

from diffae import ops
from diffae.config import get_preset
from diffae.data import synthetic
from diffae.diffusion import samplers
from diffae.engine.trainer import Trainer
from diffae.nn.autoencoder import DiffusionAutoencoder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DiffusionAutoencoder(get_preset("dae-tiny")).eval()


def test_sampler_step_host_overhead(benchmark):
    x, out = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28)
    benchmark(ops.sampler_step, x, out, None, None, 0.5, 0.8, "eps", 1.0, (0.0, 0.7, 0.7, 0.0, 0.0))


def test_ddim_10_steps_dae_tiny(benchmark, tiny):
    x, z = torch.randn(8, 1, 28, 28), torch.randn(8, tiny.cfg.encoder.z_dim)

    def run():
        with torch.no_grad():
            return samplers.sample(lambda x, t: tiny.denoise(x, torch.full((8,), t), z), x, tiny.process, 10)
    benchmark(run)


def test_train_step_dae_tiny(benchmark, tmp_path):
    trainer = Trainer(get_preset("dae-tiny").override(["train.batch_size=32"]), synthetic(n=128), tmp_path,
                      quiet=True)
    benchmark(trainer.train_step)
