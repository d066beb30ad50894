"""PNG output: image grids and strips from tensors in [-1, 1]."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import OutputError


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W') or (H', W', 3) mosaic with `nrow` images per row."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    out = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    arr = out.numpy()
    return arr[0] if c == 1 else arr[:3].transpose(1, 2, 0)


def edit_grid(originals: torch.Tensor, edits: torch.Tensor) -> np.ndarray:
    """Pipeline.edit's (S, B, C, H, W) as a mosaic: a row per image, its original first, then one
    column per scale."""
    rows = torch.cat([originals[:, None].to(edits.device), edits.transpose(0, 1)], 1)
    return grid(rows.flatten(0, 1), nrow=rows.shape[1])


def save_png(array: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    """Write atomically (temp file + rename) so an existing file is never left half-written."""
    from PIL import Image

    path = Path(path)
    if upscale > 1:
        array = array.repeat(upscale, 0).repeat(upscale, 1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
