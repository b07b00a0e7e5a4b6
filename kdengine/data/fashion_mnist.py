"""Fashion-MNIST (official 60k train / 10k test) shipped as package data, with a seeded val split.

The four official gz files are in ``kdengine/data/fashion_mnist/`` (IDX format; md5s, source and
license in ``kdengine/data/README.md``). The splits:

* ``split="train"``: the 60,000 official train images minus the ``n_val`` val images;
* ``split="val"``: ``n_val`` (default 5,000) official train images, the first ``n_val`` of the
  permutation :func:`kdengine.data.mnist._permutation` ``(60000, seed)`` (SplitMix64-driven
  Fisher-Yates in pure Python, so the same on every machine and torch / numpy version);
* ``split="test"``: the 10,000 official test images. Use it only for the final number, never for
  choosing a model, epoch or hyper-parameter (that is what "val" is for);
* ``split="train_full"``: all 60,000 official train images (e.g. a teacher trained once, before
  any val-based choice, or the final refit).

``subset=K`` (train / train_full only) keeps the first ``K`` images of a second permutation of
the 60,000 train indices (seeded with ``seed ^ _SUBSET_SALT``), skipping val images for "train".
It depends on ``n_val`` only through the val images it skips, so a student trained on
``subset=10000`` sees a fixed part of the images its full-set teacher saw. Every split and subset
comes back in file order.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from kdengine.data.mnist import _decode_images_labels, _permutation, _read_package_gz

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_TRAIN = 60_000
FASHION_MNIST_TEST = 10_000
SPLITS = ("train", "val", "test", "train_full")

_FOLDER = "fashion_mnist"
# The official file pairs, one per split of the release: (images, labels, count).
_PARTS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", FASHION_MNIST_TRAIN),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", FASHION_MNIST_TEST),
}
# md5 of the shipped gz files (also in README.md). They are Debian's dataset-fashion-mnist copies,
# whose gzip headers differ from Zalando's downloads (the decompressed bytes are identical), so
# Zalando's published md5s would not match here.
_MD5 = {
    "train-images-idx3-ubyte.gz": "cf8536b0aa1a6ac5fa3f23001093305c",
    "train-labels-idx1-ubyte.gz": "10bea18fdb374794d4bb42e356e600c9",
    "t10k-images-idx3-ubyte.gz": "f78720b4224f21cce2f2ccf2d7a94c9a",
    "t10k-labels-idx1-ubyte.gz": "0d30e22e447f3c33dab9ed536400ac01",
}
# XORed into the seed of the subset permutation, so that it is not the val permutation again (same
# seed) nor a shifted replay of its SplitMix64 states (seed + k * the SplitMix64 increment).
_SUBSET_SALT = 0xD1B54A32D192ED03
_SEED_LIMIT = 1 << 64

__all__ = [
    "load_fashion_mnist",
    "split_indices",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_TRAIN",
    "FASHION_MNIST_TEST",
    "SPLITS",
]


def _read_gz(fname: str) -> bytes:
    return _read_package_gz(_FOLDER, fname, _MD5[fname], "Fashion-MNIST")


@functools.lru_cache(maxsize=2)
def _load_part(part: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name, n = _PARTS[part]
    return _decode_images_labels(_read_gz, images_name, labels_name, n)


@functools.lru_cache(maxsize=8)
def _train_permutation(seed: int) -> np.ndarray:
    perm = np.array(_permutation(FASHION_MNIST_TRAIN, seed), dtype=np.int64)
    perm.setflags(write=False)  # shared by every caller through the cache
    return perm


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in {lo}..{hi}, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def split_indices(
    split: str = "train", *, n_val: int = 5000, seed: int = 0, subset: int | None = None
) -> np.ndarray:
    """The sorted int64 indices, into the official train file (or the test file for
    ``split="test"``), of the images :func:`load_fashion_mnist` returns for these arguments."""
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, one of {SPLITS}, got {type(split).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_int("n_val", n_val, 1, FASHION_MNIST_TRAIN - 1)
    _check_int("seed", seed, 0, _SEED_LIMIT - 1)
    if subset is not None:
        if split not in ("train", "train_full"):
            raise ValueError(f"subset applies only to split 'train' or 'train_full', got split={split!r}")
        size = FASHION_MNIST_TRAIN - (n_val if split == "train" else 0)
        _check_int("subset", subset, 1, size)

    if split == "test":
        return np.arange(FASHION_MNIST_TEST, dtype=np.int64)
    val = _train_permutation(seed)[:n_val]
    if split == "val":
        return np.sort(val)
    keep = np.ones(FASHION_MNIST_TRAIN, dtype=bool)
    if split == "train":
        keep[val] = False
    if subset is not None:
        order = _train_permutation(seed ^ _SUBSET_SALT)
        return np.sort(order[keep[order]][:subset])
    return np.flatnonzero(keep).astype(np.int64)


def load_fashion_mnist(
    split: str = "train", *, n_val: int = 5000, seed: int = 0, subset: int | None = None
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images and labels of one split (see the module docstring).

    Args:
        split: ``"train"`` (60,000 - ``n_val``), ``"val"`` (``n_val``), ``"test"`` (10,000, the
            official test set) or ``"train_full"`` (60,000).
        n_val: size of the val part held out of the official train set, 1..59999. It shapes
            "train" and "val" and is validated for every split.
        seed: seed of the val permutation and of the subset permutation, 0..2**64-1.
        subset: ``None`` or the number ``K`` of train images to keep (1..size of the split;
            "train" and "train_full" only).

    Returns:
        ``images``: float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` (pixel / 255); ``labels``: int64
        ``(N,)`` in ``0..9`` (names in :data:`FASHION_MNIST_CLASSES`), in file order. Fresh
        tensors on every call (safe to modify).
    """
    idx = split_indices(split, n_val=n_val, seed=seed, subset=subset)
    images, labels = _load_part("test" if split == "test" else "train")
    x = torch.from_numpy(images[idx]).unsqueeze(1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels[idx].astype(np.int64))
    return x, y
