"""Packed-to-packed chaining: which binary layers of a plan hand their output on as packed signs.

A binary layer whose output only reaches another XNOR layer's sign needs no float output: it can
threshold its integer counts straight to channel words (:mod:`kdengine.ops.binary.threshold`),
and the next layer reads the words. Between the two, the runtime's leaves may hold

* ``nn.Identity`` / ``nn.Dropout`` (eval): nothing to do;
* per-channel monotone float ops -- ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` in eval,
  ``nn.Hardtanh``, ``nn.ReLU`` -- folded into the producer's thresholds: they are evaluated, as
  the very modules, on candidate counts while the thresholds are bisected, so the bits are the
  signs the float path computes (a batch norm with a negative scale just flips the compare);
* one ``nn.MaxPool2d`` (conv only, no ceil_mode / indices): ``sign(max z) = max sign(z)``, so it
  pools the words (AND). Ops after the pool must be non-decreasing for the pool to commute with
  them: a batch norm after the pool chains only where every channel's scale is >= 0.

The consumer must binarize its input: a :class:`~kdengine.nn.PackedBinaryConv2d` /
:class:`~kdengine.nn.PackedBinaryLinear` in ``mode="both"`` of matching width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from kdengine.nn.packed import PackedBinaryConv2d, PackedBinaryLinear

__all__ = ["Link", "find_links", "post_ops"]

_DROPPED = (nn.Identity, nn.Dropout)


@dataclass
class Link:
    """Leaf ``producer`` thresholds its counts (through the modules at ``post``) to packed signs,
    ``pool`` (a leaf index or None) pools the words, ``consumer`` reads them; the leaves in
    ``folded`` run nowhere else."""

    producer: int
    consumer: int
    post: list[int] = field(default_factory=list)
    pool: Optional[int] = None
    folded: list[int] = field(default_factory=list)


def _bn_ok(m: nn.Module, channels: int, dims: int) -> bool:
    want = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    return (type(m) is want and not m.training and m.running_mean is not None
            and m.running_var is not None and m.num_features == channels)


def _non_decreasing(m: nn.Module) -> bool:
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.weight is None or bool((m.weight >= 0).all())
    return True  # Hardtanh, ReLU


def _width(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, PackedBinaryConv2d):
        return m.in_channels, m.out_channels
    return m.in_features, m.out_features


def find_links(leaves: list[nn.Module]) -> list[Link]:
    """The producer -> consumer chains among a plan's leaves (in execution order)."""
    links = []
    for i, m in enumerate(leaves):
        if type(m) not in (PackedBinaryConv2d, PackedBinaryLinear) or m.mode != "both":
            continue
        conv = isinstance(m, PackedBinaryConv2d)
        width = _width(m)[1]
        link = Link(producer=i, consumer=-1)
        j = i + 1
        while j < len(leaves):
            n = leaves[j]
            if type(n) in _DROPPED:
                link.folded.append(j)
            elif (_bn_ok(n, width, 4 if conv else 2) or type(n) in (nn.Hardtanh, nn.ReLU)) and (
                    link.pool is None or _non_decreasing(n)):
                link.post.append(j)
                link.folded.append(j)
            elif (conv and type(n) is nn.MaxPool2d and link.pool is None and not n.ceil_mode
                  and not n.return_indices):
                link.pool = j
            else:
                break
            j += 1
        if j < len(leaves) and type(leaves[j]) is type(m) and leaves[j].mode == "both" \
                and _width(leaves[j])[0] == width:
            link.consumer = j
            links.append(link)
    return links


def post_ops(modules: list[nn.Module], conv: bool) -> Optional[Callable[[Tensor], Tensor]]:
    """The folded modules as one function on ``(L, N)`` values (4-D ``(L, N, 1, 1)`` inside, for
    the 2-d batch norms), or None."""
    if not modules:
        return None

    def f(y: Tensor) -> Tensor:
        z = y[:, :, None, None] if conv else y
        with torch.no_grad():
            for m in modules:
                z = m(z)
        return z.reshape(y.shape)

    return f
