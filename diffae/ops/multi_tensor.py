"""In-place updates over lists of tensors (a model's parameters), each list in one launch.

multi_tensor_lerp_(dst, src, scale, weight)
    dst[i] += scale * weight * (src[i] - dst[i]) for every i   (an EMA step)

weight is an optional one-element float or bool tensor on the device (the training step's "this
step was finite" flag): a skipped step passes 0 and leaves dst exactly as it was, with no host sync.
The reference is torch._foreach_lerp_, which with a device weight runs one kernel per tensor;
the Triton kernel runs one launch for the whole list.
"""
from __future__ import annotations

import torch

from ._backend import use_triton


def multi_tensor_lerp_reference_(dst: list[torch.Tensor], src: list[torch.Tensor], scale: float,
                                 weight: torch.Tensor | None = None) -> None:
    src = [s if s.dtype == d.dtype else s.to(d.dtype) for d, s in zip(dst, src)]  # lerp wants one dtype
    if weight is None:
        torch._foreach_lerp_(dst, src, scale)
    else:
        torch._foreach_lerp_(dst, src, [weight.float().reshape(()) * scale] * len(dst))


def _check(dst: list[torch.Tensor], src: list[torch.Tensor], weight: torch.Tensor | None) -> None:
    name = "multi_tensor_lerp_"
    if len(dst) != len(src):
        raise ValueError(f"{name}: dst has {len(dst)} tensors but src has {len(src)}")
    for i, (d, s) in enumerate(zip(dst, src)):
        if d.shape != s.shape:
            raise ValueError(f"{name}: tensor {i} is {tuple(d.shape)} in dst but {tuple(s.shape)} in src")
        if d.device != s.device:
            raise ValueError(f"{name}: tensor {i} is on {d.device} in dst but on {s.device} in src")
        if not (d.is_floating_point() and s.is_floating_point()):
            raise TypeError(f"{name}: tensor {i} must be floating point, got {d.dtype} and {s.dtype}")
    numeric = weight is not None and (weight.is_floating_point() or weight.dtype == torch.bool)
    if weight is not None and (weight.numel() != 1 or not numeric):
        raise ValueError(f"{name}: weight must be a one-element float or bool tensor, got shape "
                         f"{tuple(weight.shape)} and {weight.dtype}")


def _one_launch(dst: list[torch.Tensor], src: list[torch.Tensor], weight: torch.Tensor | None) -> bool:
    """The kernel's layout: one dtype per list, contiguous, one device (the weight's too)."""
    from diffae.kernels.multi_tensor import supports  # noqa: PLC0415  (triton is imported only when used)
    devices = {t.device for t in (*dst, *src)} | ({weight.device} if weight is not None else set())
    return (len(devices) == 1 and len({t.dtype for t in dst}) == 1 and len({t.dtype for t in src}) == 1
            and supports(dst[0].dtype) and supports(src[0].dtype)
            and all(t.is_contiguous() for t in (*dst, *src)))


@torch.no_grad()
def multi_tensor_lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], scale: float,
                       weight: torch.Tensor | None = None) -> None:
    """dst[i] <- dst[i] + scale * weight * (src[i] - dst[i]) for every i, in place (weight: a
    one-element float or bool device tensor, or None for 1).  Lists of any other layout take the
    reference."""
    _check(dst, src, weight)
    if not dst:
        return
    if use_triton("multi_tensor_lerp", *dst) and _one_launch(dst, src, weight):
        from diffae.kernels.multi_tensor import lerp_ as kernel  # noqa: PLC0415
        kernel(dst, src, scale, weight)
    else:
        multi_tensor_lerp_reference_(dst, src, scale, weight)
