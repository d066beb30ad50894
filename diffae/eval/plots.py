"""PNG figures without matplotlib: a PCA scatter of embeddings coloured by class (drawn with
Pillow, already a dependency), interpolation strips and sample grids (diffae.images)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..images import grid, save_png

# matplotlib's tab10, so the figures look familiar
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(N, D) -> (N, 2) projections on the first two principal components, and their explained
    variance ratios."""
    x = x.double().cpu()
    xc = x - x.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    var = s.pow(2)
    ratio = (var[:2] / var.sum().clamp_min(1e-30)).tolist()
    return (xc @ vh[:2].T).float(), ratio + [0.0] * (2 - len(ratio))


def scatter(points: torch.Tensor, labels: torch.Tensor, class_names=None, title: str = "",
            size: tuple[int, int] = (640, 480), radius: int = 2, seed: int = 0) -> np.ndarray:
    """Draw (N, 2) points coloured by integer label into an RGB uint8 image (H, W, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, top, right, bottom = 40, 30, W - 150, H - 40   # plot area; legend on the right
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    p = points.float().cpu()
    lab = labels.long().cpu()
    lo = torch.quantile(p, 0.005, dim=0)  # robust limits: a few outliers (not drawn) do not squash the cloud
    hi = torch.quantile(p, 0.995, dim=0)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    span = (hi - lo).clamp_min(1e-12)
    u = (p - lo) / span
    inside = ((u >= 0) & (u <= 1)).all(1).tolist()
    px = (left + u[:, 0] * (right - left)).round().int().tolist()
    py = (bottom - u[:, 1] * (bottom - top)).round().int().tolist()
    draw.rectangle([left - 4, top - 4, right + 4, bottom + 4], outline=(0, 0, 0))
    order = torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    order = [i for i in order if inside[i]]
    for i in order:  # random order, so no class is always drawn on top
        c = PALETTE[int(lab[i]) % len(PALETTE)]
        draw.ellipse([px[i] - radius, py[i] - radius, px[i] + radius, py[i] + radius], fill=c)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 15, bottom + 14), "PC 1", fill=(0, 0, 0), font=font)
    draw.text((4, (top + bottom) // 2), "PC 2", fill=(0, 0, 0), font=font)
    classes = sorted(set(lab.tolist()))
    for k, c in enumerate(classes):
        y = top + 6 + 16 * k
        draw.rectangle([right + 16, y, right + 26, y + 10], fill=PALETTE[c % len(PALETTE)])
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        draw.text((right + 32, y - 1), name, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def save_pca(embeddings: torch.Tensor, labels: torch.Tensor, path: str | Path, class_names=None,
             title: str = "PCA of test embeddings") -> dict:
    pts, ratio = pca_2d(embeddings)
    full = f"{title}: PC1 {100 * ratio[0]:.1f} %, PC2 {100 * ratio[1]:.1f} % of variance"
    save_png(scatter(pts, labels, class_names, full), path)
    return {"explained_variance": ratio}


def save_strips(rows: list[torch.Tensor], path: str | Path, upscale: int = 2) -> Path:
    """Interpolation strips, one per row: each (n, C, H, W) in [-1, 1]."""
    n = rows[0].shape[0]
    return save_png(grid(torch.cat([r.cpu() for r in rows]), nrow=n), path, upscale=upscale)


def save_grid(images: torch.Tensor, path: str | Path, upscale: int = 2) -> Path:
    return save_png(grid(images), path, upscale=upscale)
