"""The GEMMs of inference copies: y = x W^T + b, optionally through the tanh GELU.  No backward.

On CUDA with the extension's diffae::lt_linear, each GEMM runs the cuBLASLt algorithm found
fastest for its problem: the first call of a shape times every candidate cuBLASLt proposes (inside
a CUDA graph, over enough copies of W that they come from memory, as in a sampling loop) and the
choice is kept for the process.  torch runs cuBLASLt's first proposal, which at few-token shapes
(batch-1 sampling: 256 tokens) often leaves most SMs idle.  DIFFAE_LT_TUNE=0 keeps that first
proposal.  A call during a CUDA-graph capture never times: an untimed shape takes the first proposal.

Elsewhere: F.linear, with the GELU as cuBLASLt's epilogue on CUDA (torch._addmm_activation), and
as a separate op on the CPU (whose _addmm_activation computes the erf GELU).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ._backend import _extension_ok, forced_backend

_TUNE = os.environ.get("DIFFAE_LT_TUNE", "1") != "0"
_choices: dict[tuple, int] = {}  # problem -> index of the fastest cuBLASLt candidate
_COLD_BYTES = 96 << 20  # more W copies than this many bytes: past the L2 cache (50 MiB on an H100/H200)


def linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, gelu: bool = False):
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


@torch.compiler.assume_constant_result  # evaluated eagerly while torch.compile traces
def _has_lt() -> bool:
    return _lt_built()


@functools.cache
def _lt_built() -> bool:
    if not _extension_ok():
        return False
    import diffae._C  # noqa: F401  (registers torch.ops.diffae; lt_linear only where cublasLt.h was found)
    return hasattr(torch.ops.diffae, "lt_linear")


def _lt_eligible(x, w, b) -> bool:
    """x (M, K): what diffae::lt_linear takes."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and (b is None or b.dtype == x.dtype) and w.is_contiguous() and x.stride(-1) == 1
            and x.shape[-1] % 8 == 0 and x.stride(0) % 8 == 0
            and forced_backend("linear") not in ("reference", "triton") and _has_lt())


def _alignment(t: torch.Tensor) -> int:
    p = t.data_ptr()
    return min(256, p & -p) if p else 256


def _key(x, w, b, gelu) -> tuple:
    return (tuple(x.shape), x.stride(0), tuple(w.shape), b is not None, gelu, x.dtype, x.device.index,
            _alignment(x), _alignment(w))


def _graph_us(fn, calls: int) -> float:
    """Median us per call of fn(i) for i < calls, captured in one CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _fastest(x, w, b, gelu) -> int:
    """Index of the fastest of cuBLASLt's candidates that agree with its first (a wrong one is skipped)."""
    lt = torch.ops.diffae
    n = lt.lt_linear_candidates(x, w, b, gelu)
    if n == 1:
        return 0
    copies = [w] + [w.clone() for _ in range(min(32, _COLD_BYTES // max(1, w.numel() * w.element_size())))]
    first = lt.lt_linear(x, w, b, gelu, 0).float()
    tol = 4 * first.abs().max().item() * torch.finfo(x.dtype).eps + 1e-3
    best, best_us = 0, float("inf")
    for algo in range(n):
        if algo and (lt.lt_linear(x, w, b, gelu, algo).float() - first).abs().max().item() > tol:
            continue
        us = _graph_us(lambda i, algo=algo: lt.lt_linear(x, copies[i % len(copies)], b, gelu, algo), 2 * len(copies))
        if us < best_us:
            best, best_us = algo, us
    return best


def _tuned(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    key = _key(x, w, b, gelu)
    algo = _choices.get(key)
    if algo is None:
        if not _TUNE:
            algo = _choices[key] = 0
        elif torch.cuda.is_current_stream_capturing():
            algo = 0  # no timing inside a capture; the shape is timed at its first call outside one
        else:
            algo = _choices[key] = _fastest(x, w, b, gelu)
    return torch.ops.diffae.lt_linear(x, w, b, gelu, algo)


@torch.library.custom_op("diffae::tuned_linear", mutates_args=())
def _tuned_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    # a custom op so that torch.compile calls it at run time: the choice needs real tensors
    return _tuned(x, w, b, gelu)


@_tuned_op.register_fake
def _(x, w, b, gelu):
    return x.new_empty((x.shape[0], w.shape[0]))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b, through the tanh GELU when gelu; (..., N) in x's dtype."""
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"linear: x (..., {x.shape[-1]}) does not match weight {tuple(w.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        return linear_reference(x, w, b, gelu)  # the fused paths have no backward
    x2 = x.reshape(-1, x.shape[-1])
    if _lt_eligible(x2, w, b):
        y = _tuned_op(x2, w, b, gelu) if torch.compiler.is_compiling() else _tuned(x2, w, b, gelu)
    elif gelu and x.is_cuda and b is not None:
        y = torch._addmm_activation(b, x2.to(w.dtype), w.t(), use_gelu=True)
    else:
        return linear_reference(x, w, b, gelu)
    return y.view(*x.shape[:-1], w.shape[0])
