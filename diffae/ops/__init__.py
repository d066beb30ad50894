"""The one seam between model code and kernels.

Model code calls these functions only; each picks the fastest available backend (C++/CUDA
extension, Triton, PyTorch reference) and falls back with a logged reason.
"""
from ._backend import report as backend_report, set_backend
from .adaln import adaln_modulate, gated_residual, gated_residual_adaln
from .attention import attention, attention_autotune, set_attention_autotune
from .mlp import gelu_mlp
from .multi_tensor import multi_tensor_lerp_
from .sampler_step import sampler_step

__all__ = ["adaln_modulate", "gated_residual", "gated_residual_adaln", "attention", "attention_autotune",
           "set_attention_autotune", "gelu_mlp", "multi_tensor_lerp_", "sampler_step", "backend_report",
           "set_backend"]
