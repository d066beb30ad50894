"""diffae: diffusion autoencoders on Triton and C++/CUDA kernels.

    from diffae import Config, get_preset, DiffusionAutoencoder, Trainer, Pipeline
"""
from .config import Config, get_preset
from .engine.pipeline import Pipeline
from .engine.trainer import Trainer
from .nn.autoencoder import DiffusionAutoencoder

__version__ = "0.1.0"
__all__ = ["Config", "get_preset", "DiffusionAutoencoder", "Trainer", "Pipeline"]
