"""Data shipped with kdengine (see ``README.md`` in this folder for sources and licenses).

* :func:`load_mnist` — the MNIST test set (10,000 digits), split 8,000 / 2,000 by a fixed seed.
* :func:`load_fashion_mnist` — Fashion-MNIST, the official 60,000 / 10,000 sets, with a seeded
  val part (default 5,000) held out of the train set and optional fixed train subsets.
"""
from kdengine.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdengine.data.mnist import MNIST_CLASSES, MNIST_TOTAL, load_mnist, split_indices

__all__ = [
    "load_mnist",
    "split_indices",
    "MNIST_TOTAL",
    "MNIST_CLASSES",
    "load_fashion_mnist",
    "FASHION_MNIST_CLASSES",
]
