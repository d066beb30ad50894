"""A linear layer whose bias gradient comes out of its weight-gradient GEMM.

Autograd's linear backward sums the output gradient over rows for the bias in a pass of its own;
where that gradient comes out of a custom kernel (attention's backward into qkv, the AdaLN ops'
into proj), torch.compile has nothing to fuse the sum into, so it rereads the whole gradient.
The extension's linear_wgrad reduces it in the epilogue of the weight gradient's GEMM (cuBLASLt
BGRADB), which reads that gradient anyway.  DIFFAE_WGRAD=unfused runs a plain GEMM and a
separate sum instead (here and in ops.gelu_mlp's backward).

Under autocast every operand is cast to autocast's dtype first, as F.linear would be.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _ext
from ._backend import forced_backend, use_extension


def weight_grads(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's (weight, bias) gradients from its 2-D output gradient and input."""
    if os.environ.get("DIFFAE_WGRAD", "epilogue") == "unfused":
        return grad.t() @ x, grad.sum(0)
    return torch.ops.diffae.linear_wgrad(grad, x)


@torch.library.custom_op("diffae_ext::linear", mutates_args=())
def _linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.addmm(b, x, w.t())


@_linear_op.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    grad = grad.contiguous()
    dw, db = weight_grads(grad, x)
    return grad @ w, dw, db


_linear_op.register_autograd(_backward, setup_context=_setup)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b (N) -> (..., N): F.linear, with the backward above on CUDA."""
    on_cuda = x.is_cuda
    # as in ops.gelu_mlp: forcing "cuda" runs the same wiring on the CPU's composite kernels (tests)
    if not (on_cuda or forced_backend("linear") == "cuda") or not use_extension("linear", x):
        return F.linear(x, w, b)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w, b))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    N, K = w.shape
    if (not grad or x.shape[-1] != K or b.shape != (N,) or not _ext.has_gemm_epilogues()
            or (on_cuda and (dtype not in (torch.float16, torch.bfloat16) or N % 8 or K % 8))):
        return F.linear(x, w, b)  # BGRADB wants 16-bit, 16-byte-aligned rows; F.linear names bad shapes
    x2, w, b = (t.to(dtype) for t in (x.reshape(-1, K), w, b))
    return _linear_op(x2.contiguous(), w.contiguous(), b).view(x.shape[:-1] + (N,))
