"""kdengine.data.load_mnist: shapes, split determinism, class coverage, corrupt-file errors."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from kdengine.data import load_mnist, split_indices
from kdengine.data import mnist as mnist_mod

# Facts about the official t10k label file (also in kdengine/data/README.md).
OFFICIAL_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_shapes_dtypes_ranges():
    for split, n in (("train", 8000), ("test", 2000), ("all", 10000)):
        x, y = load_mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0 <= int(y.min()) and int(y.max()) <= 9
    x, y = load_mnist("all")
    assert y.bincount(minlength=10).tolist() == OFFICIAL_CLASS_COUNTS
    # the images are digits: about 13 % ink on average, and they carry the label information
    assert 0.12 < x.mean().item() < 0.14


def test_split_is_deterministic_disjoint_and_complete():
    tr, te = split_indices(0, 8000)
    tr2, te2 = split_indices(0, 8000)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    both = torch.cat([tr, te])
    assert torch.equal(both.sort().values, torch.arange(10000))
    tr1, _ = split_indices(1, 8000)
    assert not torch.equal(tr, tr1)
    # the split does not depend on the global RNG
    torch.manual_seed(123)
    assert torch.equal(split_indices(0, 8000)[0], tr)
    # load_mnist returns exactly those images, fresh tensors each call
    xa, ya = load_mnist("all")
    xt, yt = load_mnist("test", seed=0)
    assert torch.equal(xt, xa[te]) and torch.equal(yt, ya[te])
    xt[0] = 5.0
    assert load_mnist("test", seed=0)[0][0].max() <= 1.0
    # n_train moves the boundary of the same permutation
    tr5, te5 = split_indices(0, 5000)
    assert torch.equal(torch.cat([tr5, te5]), both)


def test_every_class_in_both_parts():
    for seed in (0, 1):
        for split in ("train", "test"):
            _, y = load_mnist(split, seed=seed)
            counts = y.bincount(minlength=10)
            assert (counts > 0.07 * len(y)).all(), (split, seed, counts.tolist())


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_mnist("val")
    with pytest.raises(ValueError, match="n_train"):
        load_mnist("train", n_train=10000)
    with pytest.raises(ValueError, match="n_train"):
        load_mnist("train", n_train=0)
    with pytest.raises(TypeError, match="seed"):
        load_mnist("train", seed=1.5)  # type: ignore[arg-type]


def _idx(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims) + data


def test_parse_idx_valid_and_corrupt():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    ok = _idx(2051, (2, 3, 4), arr.tobytes())
    assert np.array_equal(mnist_mod.parse_idx(ok, expected_magic=2051), arr)
    with pytest.raises(ValueError, match="images.gz: corrupt IDX file: magic number 2049"):
        mnist_mod.parse_idx(_idx(2049, (24,), arr.tobytes()), expected_magic=2051, name="images.gz")
    with pytest.raises(ValueError, match="need 24 data bytes, found 23"):
        mnist_mod.parse_idx(ok[:-1], expected_magic=2051)
    with pytest.raises(ValueError, match="need 24 data bytes, found 25"):
        mnist_mod.parse_idx(ok + b"\0", expected_magic=2051)
    with pytest.raises(ValueError, match="truncated header"):
        mnist_mod.parse_idx(ok[:9], expected_magic=2051)
    with pytest.raises(ValueError, match="shorter than"):
        mnist_mod.parse_idx(b"\0\0", expected_magic=2051)
    with pytest.raises(ValueError, match="positive"):
        mnist_mod.parse_idx(_idx(2051, (0, 3, 4), b""), expected_magic=2051)


def test_corrupt_package_file_is_reported(monkeypatch):
    """A damaged gz in the package data gives a ValueError naming the file (md5 check)."""

    class Fake:
        def __init__(self, blob):
            self.blob = blob

        def joinpath(self, *parts):
            return self

        def read_bytes(self):
            return self.blob

    good = gzip.compress(_idx(2049, (3,), b"\x01\x02\x03"))
    monkeypatch.setattr(mnist_mod.resources, "files", lambda pkg: Fake(good))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is corrupt: md5"):
        mnist_mod._read_gz("t10k-labels-idx1-ubyte.gz")
