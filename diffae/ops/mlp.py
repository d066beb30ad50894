"""A transformer MLP: fc2(gelu_tanh(fc1(x))), with the GELU inside the GEMMs.

Unfused, the hidden activations (4x the width) make three extra passes through memory per step:
the GELU's forward, its backward and the first bias's gradient, each a separate kernel.  The
extension's cuBLASLt ops fold two of them into GEMM epilogues: linear_gelu writes gelu(pre) and
keeps pre for the backward (GELU_AUX_BIAS); linear_dgelu computes the second GEMM's input gradient
times gelu'(pre) (DGELU).  The first bias's gradient stays a separate sum: cuBLASLt's epilogues
that fold it in (DGELU_BGRAD; BGRADB in the weight gradient's GEMM) ran slower on an H100 than the
plain GEMM and the sum together (benchmarks/results/session17, session18).
DIFFAE_MLP_BWD=unfused runs the GELU's backward as a plain GEMM and gelu_backward instead, which
torch.compile fuses with the bias's sum.  Without autograd, the forward needs no pre: torch's own
GELU epilogue (_addmm_activation) runs instead.

Under autocast every operand is cast to autocast's dtype first, as F.linear would be, so the
fused and the reference path see the same inputs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _ext
from ._backend import forced_backend, use_extension


def gelu_mlp_reference(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _check(x, w1, b1, w2, b2) -> None:
    if x.dim() < 2:
        raise ValueError(f"gelu_mlp: x must be (..., C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != C:
        raise ValueError(f"gelu_mlp: w1 must be (hidden, C) = (hidden, {C}) for x of width {C}, got {tuple(w1.shape)}")
    N = w1.shape[0]
    for name, t, shape in (("b1", b1, (N,)), ("w2", w2, (C, N)), ("b2", b2, (C,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"gelu_mlp: {name} must be {shape} for x of width {C} and hidden width {N}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if not t.is_floating_point():
            raise TypeError(f"gelu_mlp: {name} must be floating point, got {t.dtype}")


@torch.library.custom_op("diffae_ext::gelu_mlp", mutates_args=())
def _gelu_mlp_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h, pre) for 2-D x; h and pre are returned only to be saved for the backward."""
    h, pre = torch.ops.diffae.linear_gelu(x, w1, b1)
    return torch.addmm(b2, h, w2.t()), h, pre


@_gelu_mlp_op.register_fake
def _(x, w1, b1, w2, b2):
    h = x.new_empty(x.shape[0], w1.shape[0])
    return x.new_empty(x.shape), h, torch.empty_like(h)


def _setup(ctx, inputs, output):
    x, w1, _, w2, _ = inputs
    _, h, pre = output
    ctx.save_for_backward(x, w1, w2, h, pre)


def _backward(ctx, grad, _grad_h, _grad_pre):
    x, w1, w2, h, pre = ctx.saved_tensors
    grad = grad.contiguous()
    if os.environ.get("DIFFAE_MLP_BWD", "epilogue") == "unfused":
        dpre = torch.ops.aten.gelu_backward(grad @ w2, pre, approximate="tanh")
    else:
        dpre = torch.ops.diffae.linear_dgelu(grad, w2, pre)
    return dpre @ w1, dpre.t() @ x, dpre.sum(0), grad.t() @ h, grad.sum(0)


_gelu_mlp_op.register_autograd(_backward, setup_context=_setup)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor) -> torch.Tensor:
    """x (..., C) @ w1 (N, C)^T + b1, tanh GELU, @ w2 (C, N)^T + b2 -> (..., C)."""
    _check(x, w1, b1, w2, b2)
    on_cuda = x.is_cuda
    # automatic mode fuses on CUDA only; forcing "cuda" runs the same path on the CPU's composite
    # kernels, which is how the CPU tests check the autograd wiring
    if not (on_cuda or forced_backend("gelu_mlp") == "cuda") or not use_extension("gelu_mlp", x):
        return gelu_mlp_reference(x, w1, b1, w2, b2)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    N, C = w1.shape
    if on_cuda and (dtype not in (torch.float16, torch.bfloat16) or N % 8 or C % 8):
        return gelu_mlp_reference(x, w1, b1, w2, b2)  # cuBLASLt's epilogues want 16-bit, 16-byte-aligned rows
    x2, w1, b1, w2, b2 = (t.to(dtype) for t in (x.reshape(-1, C), w1, b1, w2, b2))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x2, w1, b1, w2, b2))
    if on_cuda and not grad:
        h = torch._addmm_activation(b1, x2, w1.t(), use_gelu=True)  # cuBLASLt's GELU is the tanh one
        return torch.addmm(b2, h, w2.t()).view(x.shape[:-1] + (C,))
    if not _ext.has_linear_gelu():
        return gelu_mlp_reference(x, w1, b1, w2, b2)
    out = _gelu_mlp_op(x2.contiguous(), w1.contiguous(), b1, w2.contiguous(), b2)[0]
    return out.view(x.shape[:-1] + (C,))
