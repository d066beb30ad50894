"""One Triton launch over a list of tensors: dst[i] += w * (src[i] - dst[i]) for every i.

The EMA of a model's weights touches every parameter once per step; as torch._foreach_lerp_ with a
weight that lives on the device (the step's skip flag), it runs one kernel per tensor, ~190 for a
DiT-B autoencoder.  Here every program owns a chunk of one tensor and finds its tensor's addresses
in a table: the tensors' base pointers (int64) and sizes, and per program the tensor it works on
and where its chunk starts.  The table depends only on where the tensors live, so it is built once
per list (on the host, copied once) and reused on every call; a call is then one launch that reads
the device weight itself, with no host synchronisation, and is capturable in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048  # elements per program: 8 KiB of fp32 per operand; tiny tensors waste one partial block
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _lerp_kernel(table_ptr, n_tensors, weight_ptr, scale, DST: tl.constexpr, SRC: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    # table rows (int64): dst pointers, src pointers, sizes (n_tensors each), then per program its
    # tensor index and chunk start (one entry each, interleaved)
    pid = tl.program_id(0)
    row = table_ptr + 3 * n_tensors + 2 * pid
    i = tl.load(row)
    start = tl.load(row + 1)
    dst = tl.load(table_ptr + i).to(tl.pointer_type(DST))
    src = tl.load(table_ptr + n_tensors + i).to(tl.pointer_type(SRC))
    n = tl.load(table_ptr + 2 * n_tensors + i)
    w = scale
    if HAS_WEIGHT:
        w = tl.load(weight_ptr).to(tl.float32) * scale
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(dst + offs, mask=mask).to(tl.float32)
    s = tl.load(src + offs, mask=mask).to(tl.float32)
    tl.store(dst + offs, (d + w * (s - d)).to(DST), mask=mask)


def supports(dtype: torch.dtype) -> bool:
    return dtype in _TL_DTYPES


class _Plan:
    """The table of one (dst, src) list pair and the launch grid; valid while the tensors stay put."""

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor]):
        sizes = [t.numel() for t in dst]
        chunks = [(i, start) for i, n in enumerate(sizes) for start in range(0, n, _BLOCK)]
        head = [t.data_ptr() for t in dst] + [t.data_ptr() for t in src] + sizes
        table = torch.tensor(head + [v for chunk in chunks for v in chunk], dtype=torch.int64)
        self.table = table.to(dst[0].device)
        self.n_tensors, self.grid = len(dst), (len(chunks),)
        self.dst_dtype, self.src_dtype = _TL_DTYPES[dst[0].dtype], _TL_DTYPES[src[0].dtype]


_plans: dict[tuple, _Plan] = {}


def lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], scale: float,
          weight: torch.Tensor | None = None) -> None:
    """dst[i] <- dst[i] + w (src[i] - dst[i]), w = scale * weight (a one-element device tensor) or
    scale alone.  The lists must be checked by the caller: same lengths, shapes, device, one dtype
    per list, contiguous, non-empty."""
    key = (dst[0].dtype, src[0].dtype, dst[0].device, *(t.data_ptr() for t in dst), *(t.data_ptr() for t in src),
           *(t.numel() for t in dst))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 8:  # a model that moved leaves its old tables behind: drop them
            _plans.clear()
        plan = _plans[key] = _Plan(dst, src)
    _lerp_kernel[plan.grid](plan.table, plan.n_tensors, plan.table if weight is None else weight, float(scale),
                            DST=plan.dst_dtype, SRC=plan.src_dtype, HAS_WEIGHT=weight is not None,
                            BLOCK=_BLOCK, num_warps=8)
