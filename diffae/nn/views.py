"""The encoder's view of x0 in training: a random crop, resized back, optionally mirrored.

The denoiser still denoises x0 itself, so the code has to carry what survives a change of view
(class, shape) rather than where each pixel is: the cross-view bottleneck of SODA (Hudson et al.,
CVPR 2024), here as an option of every preset.  A view is one affine map per image, drawn apart
from the loss (like its noise) so that no random op sits inside a compiled graph, and applied in the
loss with `affine_grid` + `grid_sample`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ASPECT = (3 / 4, 4 / 3)  # the crop's width / height, log-uniform in this range


def draw_views(n: int, min_area: float, flip: bool, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates (in [-1, 1]): each a crop of a uniform
    fraction of the image's area in [min_area, 1], inside the image, mirrored left-right with
    probability 1/2 when `flip`."""
    u = torch.rand((n, 5), device=device, generator=generator)
    area = min_area + (1 - min_area) * u[:, 0]
    # the aspect range narrows as the area nears 1, so that the crop fits (w, h <= 1): at area 1
    # the view is the whole image, undistorted
    log_area = torch.log(area)
    lo = log_area.clamp(min=math.log(ASPECT[0]))
    hi = (-log_area).clamp(max=math.log(ASPECT[1]))
    aspect = torch.exp(lo + (hi - lo) * u[:, 1])
    w = torch.sqrt(area * aspect)  # half-sizes in normalised coordinates
    h = torch.sqrt(area / aspect)
    tx = (1 - w) * (2 * u[:, 2] - 1)  # the centre, so that the crop stays inside the image
    ty = (1 - h) * (2 * u[:, 3] - 1)
    sx = torch.where(u[:, 4] < 0.5, -w, w) if flip else w
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, h, ty], -1)], -2)


def apply_views(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) seen through the affine maps theta (B, 2, 3), bilinearly resampled at x's size."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
