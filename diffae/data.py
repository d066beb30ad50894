"""Datasets as whole tensors: Fashion-MNIST (Debian package), .npy/.npz arrays, image folders,
and a synthetic set for tests.

Everything here is small enough to live in memory (and on the GPU) whole: images are returned as
float32 in [-1, 1], shaped (N, C, H, W), with integer labels (N,) or None.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

FASHION_MNIST_DIR = Path(os.environ.get("DIFFAE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Dataset:
    images: torch.Tensor          # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None   # (N,) int64
    name: str

    def __post_init__(self):
        if self.images.shape[0] == 0:
            raise DataError(f"dataset {self.name!r} is empty")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "Dataset":
        labels = None if self.labels is None else self.labels.to(device)
        return Dataset(self.images.to(device), labels, self.name)


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"missing dataset file {path}; install it with "
                        "`apt-get install -y dataset-fashion-mnist` or set DIFFAE_FASHION_MNIST")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise DataError(f"{path} is truncated: {data.size} values for shape {dims}")
        return data.reshape(dims)
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)


def fashion_mnist(split: str = "train", root: Path | None = None) -> Dataset:
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; choose train or test")
    root = Path(root) if root else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return Dataset(_from_uint8(images)[:, None], torch.from_numpy(labels.astype(np.int64)),
                   f"fashion-mnist/{split}")


def from_array(path: str | Path) -> Dataset:
    """A .npy of images, or a .npz with 'images' (or 'x') and optional 'labels' (or 'y').
    uint8 arrays are scaled from [0, 255], float arrays are taken as [0, 1] unless they already
    have negatives; (N, H, W) gets one channel, (N, H, W, C) with C in (1, 3, 4) is moved to NCHW."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"missing dataset file {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = set(loaded.files)
        key = "images" if "images" in keys else "x" if "x" in keys else None
        if key is None:
            raise DataError(f"{path} has no 'images' or 'x' array (found {sorted(keys)})")
        images = loaded[key]
        lkey = "labels" if "labels" in keys else "y" if "y" in keys else None
        labels = torch.from_numpy(loaded[lkey].astype(np.int64)) if lkey else None
    else:
        images = loaded
    return Dataset(_to_nchw(images, str(path)), labels, path.name)


def _to_nchw(images: np.ndarray, name: str) -> torch.Tensor:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise DataError(f"{name}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), got {images.shape}")
    if images.dtype == np.uint8:
        x = _from_uint8(images)
    elif np.issubdtype(images.dtype, np.floating):
        x = torch.from_numpy(images.astype(np.float32))
        if float(x.min()) >= 0.0:
            x = x * 2 - 1
    else:
        raise DataError(f"{name}: unsupported image dtype {images.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: images contain NaN or Inf")
    return x.contiguous()


def from_folder(path: str | Path) -> Dataset:
    """Every PNG/JPEG in a folder (not recursive), all of one size; grey stays 1 channel, else RGB."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"missing image folder {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no PNG or JPEG images in {path}")
    arrays, size = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
                a = np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {f}: {exc}") from None
        if size is None:
            size = a.shape
        elif a.shape != size:
            raise DataError(f"images in {path} differ in size: {files[0].name} is {size}, {f.name} is {a.shape}")
        arrays.append(a)
    stacked = np.stack(arrays)
    return Dataset(_to_nchw(stacked if stacked.ndim == 4 else stacked, str(path)), None, path.name)


def synthetic(n: int = 256, channels: int = 1, size: int = 28, classes: int = 4, seed: int = 0) -> Dataset:
    """Blobs whose position depends on the class: learnable in seconds, for tests."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = labels.float() * (2 * torch.pi / classes)
    cx, cy = 0.5 * torch.cos(angle), 0.5 * torch.sin(angle)
    jitter = 0.05 * torch.randn(n, 2, generator=g)
    d2 = (xx[None] - (cx + jitter[:, 0])[:, None, None]) ** 2 + (yy[None] - (cy + jitter[:, 1])[:, None, None]) ** 2
    img = torch.exp(-d2 / 0.05) * 2 - 1  # (n, size, size) in [-1, 1]
    return Dataset(img[:, None].repeat(1, channels, 1, 1).contiguous(), labels, "synthetic")


def load(name: str, split: str = "train") -> Dataset:
    """'fashion-mnist', 'synthetic', a .npy/.npz file or an image folder."""
    if name == "fashion-mnist":
        return fashion_mnist(split)
    if name == "synthetic":
        return synthetic(seed=0 if split == "train" else 1)
    p = Path(name)
    if p.suffix in (".npy", ".npz"):
        return from_array(p)
    if p.is_dir():
        return from_folder(p)
    raise DataError(f"unknown dataset {name!r}: use fashion-mnist, synthetic, a .npy/.npz file or an image folder")
