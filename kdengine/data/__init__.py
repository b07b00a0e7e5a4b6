"""Data shipped with kdengine (see ``README.md`` in this folder for sources and licenses).

* :func:`load_mnist` — the MNIST test set (10,000 digits), split 8,000 / 2,000 by a fixed seed.
"""
from kdengine.data.mnist import MNIST_CLASSES, MNIST_TOTAL, load_mnist, split_indices

__all__ = ["load_mnist", "split_indices", "MNIST_TOTAL", "MNIST_CLASSES"]
