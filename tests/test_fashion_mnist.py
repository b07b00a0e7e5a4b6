"""kdengine.data.load_fashion_mnist: shapes, official class counts, seeded val / subset splits,
md5 check, argument errors."""
from __future__ import annotations

import pytest
import torch

from kdengine.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdengine.data import fashion_mnist as fm
from kdengine.data import mnist as mnist_mod

SIZES = {"train": 55_000, "val": 5_000, "test": 10_000, "train_full": 60_000}


@pytest.fixture(scope="module")
def full():
    """All 60,000 official train images and labels, decoded once for the file."""
    return load_fashion_mnist("train_full")


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in (x.reshape(len(x), -1) * 255).round().to(torch.uint8).numpy()}


def test_classes():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_shapes_dtypes_ranges_of_every_split(full):
    for split, n in SIZES.items():
        x, y = full if split == "train_full" else load_fashion_mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32, split
        assert y.shape == (n,) and y.dtype == torch.int64, split
        assert x.min() == 0.0 and x.max() == 1.0, split
        assert 0 <= int(y.min()) and int(y.max()) <= 9, split
        # clothes on black: about 29 % mean intensity (MNIST digits: 13 %)
        assert 0.27 < x.mean().item() < 0.30, split


def test_official_class_counts(full):
    # the release is balanced by construction (kdengine/data/README.md)
    assert full[1].bincount(minlength=10).tolist() == [6000] * 10
    assert load_fashion_mnist("test")[1].bincount(minlength=10).tolist() == [1000] * 10


def test_train_and_val_partition_the_official_train_set(full):
    tr = fm.split_indices("train")
    va = fm.split_indices("val")
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(60_000))
    xt, yt = load_fashion_mnist("train")
    xv, yv = load_fashion_mnist("val")
    assert torch.equal(xt, full[0][tr]) and torch.equal(yt, full[1][tr])
    assert torch.equal(xv, full[0][va]) and torch.equal(yv, full[1][va])
    # fresh tensors: changing one does not reach the cache
    xv[0] = 7.0
    assert load_fashion_mnist("val")[0][0].max() <= 1.0


def test_split_depends_only_on_seed():
    va = fm.split_indices("val", seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert (fm.split_indices("val", seed=0) == va).all()
    assert not (fm.split_indices("val", seed=1) == va).all()
    # n_val moves the boundary of the same permutation
    assert set(fm.split_indices("val", n_val=1000).tolist()) <= set(va.tolist())


def test_subset_is_fixed_and_excludes_val(full):
    sub = fm.split_indices("train", subset=10_000)
    assert len(sub) == 10_000 and len(set(sub.tolist())) == 10_000
    assert set(sub.tolist()) <= set(fm.split_indices("train").tolist())
    assert not set(sub.tolist()) & set(fm.split_indices("val").tolist())
    assert (fm.split_indices("train", subset=10_000) == sub).all()
    assert not (fm.split_indices("train", subset=10_000, seed=1) == sub).all()
    # smaller subsets nest in larger ones
    assert set(fm.split_indices("train", subset=2_000).tolist()) <= set(sub.tolist())
    # n_val changes the subset only by the val images it skips
    sub_full = set(fm.split_indices("train_full", subset=12_000).tolist())
    assert set(sub.tolist()) <= sub_full
    sub6k = set(fm.split_indices("train", n_val=6000, subset=10_000).tolist())
    val6k = set(fm.split_indices("val", n_val=6000).tolist())
    assert set(sub.tolist()) - val6k <= sub6k
    # the subset is not the val permutation over again
    assert len(set(fm.split_indices("train_full", subset=5000).tolist()) & set(fm.split_indices("val").tolist())) < 1000
    # load returns those images
    x, y = load_fashion_mnist("train", subset=10_000)
    assert torch.equal(x, full[0][sub]) and torch.equal(y, full[1][sub])
    assert _rows(x[:50]) <= _rows(load_fashion_mnist("train")[0])


def test_corrupt_package_file_is_reported(monkeypatch):
    """A damaged gz in the package data gives a ValueError naming the file (md5 check)."""
    name = "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(mnist_mod._read_package_bytes("fashion_mnist", name))
    blob[len(blob) // 2] ^= 0xFF
    monkeypatch.setattr(mnist_mod, "_read_package_bytes", lambda folder, fname: bytes(blob))
    with pytest.raises(ValueError, match=f"Fashion-MNIST file {name} is corrupt: md5"):
        fm._read_gz(name)
    # the loader itself reports it (bypassing the cache of the good decode)
    monkeypatch.setattr(fm, "_load_part", fm._load_part.__wrapped__)
    with pytest.raises(ValueError, match="is corrupt: md5"):
        load_fashion_mnist("test")


def test_missing_package_file_is_reported(monkeypatch):
    def missing(folder, fname):
        raise FileNotFoundError(fname)

    monkeypatch.setattr(mnist_mod, "_read_package_bytes", missing)
    with pytest.raises(FileNotFoundError, match="missing from the kdengine package data .*fashion_mnist"):
        fm._read_gz("train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"split": "validation"}, ValueError, "split must be one of"),
        ({"split": 1}, TypeError, "split must be a str"),
        ({"n_val": 0}, ValueError, r"n_val must be in 1\.\.59999, got 0"),
        ({"n_val": 60_000}, ValueError, "n_val must be in 1..59999"),
        ({"n_val": 5000.0}, TypeError, "n_val must be an int"),
        ({"n_val": True}, TypeError, "n_val must be an int"),
        ({"seed": -1}, ValueError, "seed must be in 0.."),
        ({"seed": 1 << 64}, ValueError, "seed must be in 0.."),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"split": "val", "subset": 10}, ValueError, "subset applies only to split 'train' or 'train_full'"),
        ({"split": "test", "subset": 10}, ValueError, "subset applies only"),
        ({"subset": 0}, ValueError, r"subset must be in 1\.\.55000"),
        ({"subset": 55_001}, ValueError, r"subset must be in 1\.\.55000, got 55001"),
        ({"split": "train_full", "subset": 60_001}, ValueError, r"subset must be in 1\.\.60000"),
        ({"subset": "10k"}, TypeError, "subset must be an int"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_fashion_mnist(**kwargs)
