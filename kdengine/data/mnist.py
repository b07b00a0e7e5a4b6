"""The MNIST test set shipped as package data, with a fixed seeded train/test split.

Only the official 10,000-image MNIST *test* set is shipped (``kdengine/data/mnist/``, IDX format,
gzipped; source and license in ``kdengine/data/README.md``). kdengine's experiments split it:

* ``split="train"``: the first ``n_train`` (default 8,000) images of a permutation of the
  10,000 indices: Fisher-Yates shuffle driven by SplitMix64 seeded with ``seed``
  (:func:`_permutation`; pure Python, so independent of the torch and numpy versions);
* ``split="test"``: the remaining ``10000 - n_train`` (default 2,000) images;
* ``split="all"``: all 10,000 in file order.

The permutation depends only on ``seed`` (not on global RNG state, library versions or threads), so
the split is the same on every machine and in every run; report ``seed`` and ``n_train`` with any
result. Note that these "train" images are the official MNIST *test* images: numbers on this split
are not comparable to numbers on the official 60k/10k split.

IDX format (LeCun et al.): big-endian int32 magic ``0x00000803`` (2051, uint8 3-d: images) or
``0x00000801`` (2049, uint8 1-d: labels), one big-endian int32 per dimension, then the uint8 data.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import struct
import zlib
from collections.abc import Callable
from importlib import resources

import numpy as np
import torch
from torch import Tensor

MNIST_TOTAL = 10_000
MNIST_CLASSES = 10
_IMAGES = "t10k-images-idx3-ubyte.gz"
_LABELS = "t10k-labels-idx1-ubyte.gz"
# md5 of the official gz files (also in README.md); checked on load, so a damaged install is
# reported instead of training on garbage.
_MD5 = {
    _IMAGES: "9fb629c4189551a2d022fa330f9573f3",
    _LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
}
_MAGIC_IMAGES = 2051
_MAGIC_LABELS = 2049

__all__ = ["load_mnist", "split_indices", "parse_idx", "MNIST_TOTAL", "MNIST_CLASSES"]


def parse_idx(raw: bytes, *, expected_magic: int, name: str = "IDX data") -> np.ndarray:
    """Parse an (uncompressed) IDX file into a uint8 array of the shape its header declares.

    Raises ValueError naming ``name`` if the magic number is not ``expected_magic`` (uint8 data
    with the expected number of dimensions), a dimension is 0, or the data length does not equal
    the product of the dimensions.
    """
    if len(raw) < 4:
        raise ValueError(f"{name}: corrupt IDX file: {len(raw)} bytes, shorter than the 4-byte magic")
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != expected_magic:
        raise ValueError(
            f"{name}: corrupt IDX file: magic number {magic} (0x{magic & 0xFFFFFFFF:08x}), "
            f"expected {expected_magic} (0x{expected_magic:08x})"
        )
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{name}: corrupt IDX file: truncated header ({len(raw)} bytes, need {head})")
    dims = struct.unpack(f">{ndim}i", raw[4:head])
    if any(d <= 0 for d in dims):
        raise ValueError(f"{name}: corrupt IDX file: dimensions {dims} must be positive")
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - head
    if got != expected:
        raise ValueError(
            f"{name}: corrupt IDX file: dimensions {dims} need {expected} data bytes, found {got}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _read_package_bytes(folder: str, fname: str) -> bytes:
    return resources.files("kdengine.data").joinpath(folder, fname).read_bytes()


def _read_package_gz(folder: str, fname: str, md5: str, dataset: str) -> bytes:
    """The decompressed content of the package-data file ``kdengine/data/<folder>/<fname>``.

    The md5 of the gz file is checked against ``md5`` first, so a damaged or swapped install is
    reported (naming ``dataset`` and the file) instead of being trained on.
    """
    try:
        blob = _read_package_bytes(folder, fname)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{dataset} file {fname} is missing from the kdengine package data (kdengine/data/{folder}/); "
            "reinstall kdengine"
        ) from None
    got = hashlib.md5(blob).hexdigest()
    if got != md5:
        raise ValueError(f"{dataset} file {fname} is corrupt: md5 {got}, expected {md5}; reinstall kdengine")
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:  # pragma: no cover - md5 catches this first
        raise ValueError(f"{dataset} file {fname} is not a valid gzip file: {exc}") from None


def _read_gz(fname: str) -> bytes:
    return _read_package_gz("mnist", fname, _MD5[fname], "MNIST")


def _decode_images_labels(
    read_gz: Callable[[str], bytes], images_name: str, labels_name: str, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 ``(n, 28, 28)`` images and ``(n,)`` labels of an IDX file pair, checked for the
    sizes and the 10 classes every MNIST-format release has."""
    images = parse_idx(read_gz(images_name), expected_magic=_MAGIC_IMAGES, name=images_name)
    labels = parse_idx(read_gz(labels_name), expected_magic=_MAGIC_LABELS, name=labels_name)
    if images.shape != (n, 28, 28):
        raise ValueError(f"{images_name}: expected shape ({n}, 28, 28), got {images.shape}")
    if labels.shape != (n,):
        raise ValueError(f"{labels_name}: expected shape ({n},), got {labels.shape}")
    if int(labels.max()) >= MNIST_CLASSES:
        raise ValueError(f"{labels_name}: labels must be in 0..9, found {int(labels.max())}")
    return images, labels


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    return _decode_images_labels(_read_gz, _IMAGES, _LABELS, MNIST_TOTAL)


def split_indices(seed: int = 0, n_train: int = 8000) -> tuple[Tensor, Tensor]:
    """The (train, test) index tensors (int64) of the seeded split of the 10,000 images."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(n_train, bool) or not isinstance(n_train, int):
        raise TypeError(f"n_train must be an int, got {type(n_train).__name__}")
    if not 0 < n_train < MNIST_TOTAL:
        raise ValueError(f"n_train must be in 1..{MNIST_TOTAL - 1}, got {n_train}")
    perm = torch.tensor(_permutation(MNIST_TOTAL, seed), dtype=torch.int64)
    return perm[:n_train], perm[n_train:]


_MASK64 = (1 << 64) - 1


def _permutation(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` that depends on ``seed`` only, on any machine and any
    version of torch or numpy: Fisher-Yates driven by SplitMix64 (Steele et al. 2014)."""
    state = seed & _MASK64
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        j = z % (i + 1)  # modulo bias < 1e-15 for n = 10,000: irrelevant here
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def load_mnist(split: str = "train", seed: int = 0, n_train: int = 8000) -> tuple[Tensor, Tensor]:
    """MNIST images and labels for one part of the fixed split (see the module docstring).

    Args:
        split: ``"train"`` (``n_train`` images), ``"test"`` (the other ``10000 - n_train``) or
            ``"all"`` (10,000, file order).
        seed: seed of the permutation that defines the split.
        n_train: size of the train part, 1..9999.

    Returns:
        ``images``: float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` (pixel / 255); ``labels``: int64
        ``(N,)`` in ``0..9``. Fresh tensors on every call (safe to modify).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    train_idx, test_idx = split_indices(seed, n_train)
    images, labels = _load_raw()
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    if split != "all":
        idx = train_idx if split == "train" else test_idx
        x, y = x[idx], y[idx]
    return x.to(torch.float32).div_(255.0), y
