"""Adaptive LayerNorm (AdaLN-Zero) ops: the memory-bound glue of every DiT block.

adaln_modulate        LayerNorm without affine, then x * (1 + scale) + shift
gated_residual        x + gate * y
gated_residual_adaln  both of the above fused: the residual update of one sublayer and the
                      modulated LayerNorm input of the next, in one pass over the activations

x is (B, N, C); shift, scale and gate are per sample (B, C) or per token (B, N, C).
The *_reference functions are the specification: tests, benchmarks and the CPU path use them.
They compute in fp32 and return x's dtype, or out_dtype for the modulated output h: under autocast
the model passes the GEMM's dtype, so the kernel writes what the next projection reads and no cast
pass over the activations follows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton


def _check(name: str, x: torch.Tensor, **mods: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (B, N, C), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    B, N, C = x.shape
    for key, m in mods.items():
        if m.shape not in ((B, C), (B, N, C)):
            raise ValueError(f"{name}: {key} must be (B, C) = {(B, C)} or (B, N, C) = {(B, N, C)}, "
                             f"got {tuple(m.shape)}")
        if not m.is_floating_point():
            raise TypeError(f"{name}: {key} must be floating point, got {m.dtype}")
        if m.device != x.device:
            raise ValueError(f"{name}: {key} is on {m.device} but x is on {x.device}")


def _check_y(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """The sublayer output y added into the residual x: same shape and device, floating point."""
    if y.shape != x.shape:
        raise ValueError(f"{name}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{name}: y must be floating point, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"{name}: y is on {y.device} but x is on {x.device}")


def _per_token(m: torch.Tensor) -> torch.Tensor:
    return m.float().unsqueeze(1) if m.dim() == 2 else m.float()


def adaln_modulate_reference(x, shift, scale, eps: float = 1e-6, out_dtype=None):
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (h * (1 + _per_token(scale)) + _per_token(shift)).to(out_dtype or x.dtype)


def gated_residual_reference(x, gate, y):
    return (x.float() + _per_token(gate) * y.float()).to(x.dtype)


def gated_residual_adaln_reference(x, gate, y, shift, scale, eps: float = 1e-6, out_dtype=None):
    r = gated_residual_reference(x, gate, y)
    return r, adaln_modulate_reference(r, shift, scale, eps, out_dtype)


def _check_out_dtype(name: str, out_dtype) -> None:
    if out_dtype is not None and out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                   out_dtype: torch.dtype | None = None):
    """LayerNorm(x) * (1 + scale) + shift, normalising over the last dim without affine; the
    result in out_dtype (default x's dtype)."""
    _check("adaln_modulate", x, shift=shift, scale=scale)
    _check_out_dtype("adaln_modulate", out_dtype)
    if use_triton("adaln_modulate", x, shift, scale):
        from diffae.kernels import adaln as k
        return k.adaln_modulate(x, shift, scale, eps, out_dtype)
    return adaln_modulate_reference(x, shift, scale, eps, out_dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor):
    """x + gate * y (the AdaLN-Zero residual update)."""
    _check("gated_residual", x, gate=gate)
    _check_y("gated_residual", x, y)
    if use_triton("gated_residual", x, gate, y):
        from diffae.kernels import adaln as k
        return k.gated_residual(x, gate, y)
    return gated_residual_reference(x, gate, y)


def gated_residual_adaln(x, gate, y, shift, scale, eps: float = 1e-6, out_dtype: torch.dtype | None = None):
    """(x + gate * y, adaln_modulate(x + gate * y, shift, scale)) in one pass; the second in
    out_dtype (default x's dtype)."""
    _check("gated_residual_adaln", x, gate=gate, shift=shift, scale=scale)
    _check_y("gated_residual_adaln", x, y)
    _check_out_dtype("gated_residual_adaln", out_dtype)
    if use_triton("gated_residual_adaln", x, gate, y, shift, scale):
        from diffae.kernels import adaln as k
        return k.gated_residual_adaln(x, gate, y, shift, scale, eps, out_dtype)
    return gated_residual_adaln_reference(x, gate, y, shift, scale, eps, out_dtype)
