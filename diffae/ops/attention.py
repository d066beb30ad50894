"""Multi-head attention straight from the packed QKV projection.

qkv is (B, N, 3, H, D) exactly as `Linear(C, 3C)` writes it; the output is (B, N, H * D), ready
for the out-projection, so no permute or contiguous copy is needed around the op.  Optional:
per-head RMS QK-norm with learned weights (D,), and extra key/value tokens `kv_extra`
(B, M, 2, H, D) that every query also attends to (cross-attention conditioning on z).
Non-causal.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._backend import use_triton


def _check(qkv, q_norm_weight, k_norm_weight, kv_extra) -> None:
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention: qkv must be (B, N, 3, H, D), got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"attention: qkv must be floating point, got {qkv.dtype}")
    B, N, _, H, D = qkv.shape
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("attention: pass both q_norm_weight and k_norm_weight, or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and w.shape != (D,):
            raise ValueError(f"attention: {name} must be (D,) = ({D},), got {tuple(w.shape)}")
    if kv_extra is not None:
        if kv_extra.dim() != 5 or kv_extra.shape[0] != B or kv_extra.shape[2:] != (2, H, D):
            raise ValueError(f"attention: kv_extra must be (B, M, 2, H, D) = ({B}, M, 2, {H}, {D}), "
                             f"got {tuple(kv_extra.shape)}")
        if kv_extra.dtype != qkv.dtype:
            raise TypeError(f"attention: kv_extra dtype {kv_extra.dtype} differs from qkv's {qkv.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def attention_reference(qkv, q_norm_weight=None, k_norm_weight=None, kv_extra=None,
                        eps: float = 1e-6, upcast: bool = False):
    """SDPA on permuted copies; `upcast=True` computes in fp32 (the test reference)."""
    dtype = qkv.dtype
    if upcast:
        qkv = qkv.float()
        kv_extra = None if kv_extra is None else kv_extra.float()
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.unbind(2)  # each (B, N, H, D)
    if kv_extra is not None:
        k = torch.cat([k, kv_extra[:, :, 0]], 1)
        v = torch.cat([v, kv_extra[:, :, 1]], 1)
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).reshape(B, N, H * D).to(dtype)  # (B, N, H*D)


_autotune: bool | None = None  # set_attention_autotune's choice; None: on


def set_attention_autotune(on: bool | None) -> None:
    """Whether the Triton attention times its candidate block sizes at the first call of each
    shape (on, the default: the timings stay in Triton's disk cache) or takes its fixed configs
    (off), for this process.  DIFFAE_ATTN_AUTOTUNE=0 or 1, when set, wins.  A shape that already
    ran keeps its config."""
    global _autotune
    _autotune = on


def attention_autotune() -> bool:
    env = os.environ.get("DIFFAE_ATTN_AUTOTUNE")
    if env is not None:
        return env != "0"
    return True if _autotune is None else _autotune


def attention(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
              k_norm_weight: torch.Tensor | None = None, kv_extra: torch.Tensor | None = None,
              eps: float = 1e-6) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head, from packed qkv (B, N, 3, H, D) to (B, N, H*D)."""
    _check(qkv, q_norm_weight, k_norm_weight, kv_extra)
    if qkv.dtype in (torch.float16, torch.bfloat16) and use_triton("attention", qkv):
        from diffae.kernels import attention as k
        if k.supports(qkv, kv_extra, q_norm_weight):
            return k.attention(qkv, q_norm_weight, k_norm_weight, kv_extra, eps)
    return attention_reference(qkv, q_norm_weight, k_norm_weight, kv_extra, eps)
