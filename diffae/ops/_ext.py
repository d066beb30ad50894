"""Thin wrappers over the compiled extension diffae._C (loaded lazily, never at import time)."""
from __future__ import annotations

import torch


def _lib():
    import diffae._C  # noqa: F401  (registers the torch.ops.diffae namespace)
    return torch.ops.diffae


def has_sampler_step() -> bool:
    return hasattr(_lib(), "sampler_step")


# evaluated eagerly while torch.compile traces: dynamo cannot trace the import, and a loaded
# extension's ops cannot change within a process
@torch.compiler.assume_constant_result
def has_linear_gelu() -> bool:
    return hasattr(_lib(), "linear_gelu")


def sampler_step(x, out, prev, noise, alpha, sigma, pred, clip, coeffs):
    from .sampler_step import PREDICTIONS
    # The kernels take contiguous inputs and fp32 prev/noise (the reference upcasts them the same way);
    # both are no-ops in the sampler loop, where every buffer already is so.
    prev = None if prev is None else prev.float().contiguous()
    noise = None if noise is None else noise.float().contiguous()
    return tuple(_lib().sampler_step(x.contiguous(), out.contiguous(), prev, noise, float(alpha), float(sigma),
                                     PREDICTIONS.index(pred), float(clip), [float(c) for c in coeffs]))


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """x + alpha * y: the extension's first, trivial op, used to check that a build works."""
    return _lib().scale_add(x, y, float(alpha))
