import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from diffae import data
from diffae.errors import DataError


def test_fashion_mnist_loads_from_the_debian_package():
    ds = data.fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.labels.shape == (10000,)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert set(ds.labels.unique().tolist()) == set(range(10))


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        data.fashion_mnist("train", root=tmp_path)


def test_truncated_idx_file(tmp_path):
    for name, dims in (("t10k-images-idx3-ubyte.gz", (5, 28, 28)), ("t10k-labels-idx1-ubyte.gz", (5,))):
        header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + bytes(10))  # far fewer bytes than the header promises
    with pytest.raises(DataError, match="truncated"):
        data.fashion_mnist("test", root=tmp_path)


def test_arrays_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", imgs)
    ds = data.from_array(tmp_path / "a.npy")
    assert ds.images.shape == (6, 3, 16, 16) and ds.labels is None
    assert torch.allclose(ds.images[0, 0], torch.from_numpy(imgs[0, :, :, 0] / 127.5 - 1).float(), atol=1e-6)
    np.savez(tmp_path / "b.npz", x=rng.random((4, 8, 8)).astype(np.float32), y=np.arange(4))
    ds = data.from_array(tmp_path / "b.npz")
    assert ds.images.shape == (4, 1, 8, 8) and ds.labels.tolist() == [0, 1, 2, 3]
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_bad_arrays(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((2, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="NaN or Inf"):
        data.from_array(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="empty"):
        data.from_array(tmp_path / "empty.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read"):
        data.from_array(tmp_path / "junk.npy")
    with pytest.raises(DataError, match="missing dataset file"):
        data.from_array(tmp_path / "nope.npy")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = data.from_folder(tmp_path)
    assert ds.images.shape == (3, 1, 12, 12)
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        data.from_folder(tmp_path)
    (tmp_path / "odd.png").unlink()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        data.from_folder(tmp_path)


def test_empty_folder_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="no PNG or JPEG"):
        data.from_folder(tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
