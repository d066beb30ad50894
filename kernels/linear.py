"""Triton GEMM for few-token linear layers: y = x W^T + b, optionally through the tanh GELU.

Sampling at batch 1 multiplies 256 tokens by each weight; cuBLAS spends ~6 us on each such GEMM,
bound by latency rather than FLOPs or bytes.  This kernel is the plain tiled GEMM (fp32
accumulation, bias and GELU in the epilogue) whose tile shapes benchmarks/bench_small_gemm.py
sweeps against cuBLAS.  x (M, K) and W (N, K) in bf16 or fp16, as nn.Linear stores W.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _dot  # bf16 dots the interpreter gets right


@triton.jit
def _tanh(v):
    return 2 * tl.sigmoid(2 * v) - 1


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, sxk, swn, swk, sym, syn,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN)
    pm, pn = pid // n_tiles, pid % n_tiles  # neighbouring programs share an x tile in L2
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        kk = k + rk
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = _dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:  # tanh approximation, as F.gelu(approximate="tanh")
        acc = 0.5 * acc * (1 + _tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, gelu: bool = False,
           BM: int = 64, BN: int = 64, BK: int = 64, stages: int = 3, warps: int = 4) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T + b, through the tanh GELU when gelu; in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _linear_kernel[grid](x, w, b if b is not None else w, y, M, N, K, *x.stride(), *w.stride(), *y.stride(),
                         BM=BM, BN=BN, BK=BK, HAS_BIAS=b is not None, GELU=gelu,
                         num_stages=stages, num_warps=warps)
    return y
