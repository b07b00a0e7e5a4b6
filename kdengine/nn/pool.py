"""Binary max-pool layer: max-pooling that runs on packed channel words when its input is packed.

``sign(max z) = max sign(z)``, so between two binary layers a max-pool may pool the signs instead
of the floats: :class:`BinaryMaxPool2d` takes either a float ``(N, C, H, W)`` tensor (then it is
``F.max_pool2d``, bit for bit ``nn.MaxPool2d``) or packed channel words
(:func:`kdengine.ops.binary.pack_channels`, a binary layer's packed output), pooled with
:func:`kdengine.ops.binary.binary_max_pool2d` (AND of the words, 32 channels per operation).
The inference runtime (:mod:`kdengine.infer`) runs an ``nn.MaxPool2d`` between two XNOR layers
the same way (:func:`word_pool_plan`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from kdengine.nn.plan import LayerPlan, resolve_backend
from kdengine.ops.binary import PackedSigns, binary_max_pool2d
from kdengine.ops.binary.op import IntPair
from kdengine.ops.binary.pool import check_pool_geometry, pool_out_hw

__all__ = ["BinaryMaxPool2d", "word_pool_plan"]


def word_pool_plan(x: PackedSigns, kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair,
                   dilation: IntPair, backend: Optional[str]) -> LayerPlan:
    """The plan of a max-pool on packed channel words ``x`` (logical ``(N, H, W, C)``)."""
    k, s, p, d = check_pool_geometry(kernel_size, stride, padding, dilation)
    be = resolve_backend("binary_max_pool2d", x.device, backend)
    b, h, w, c = x.shape
    oh, ow = pool_out_hw((h, w), k, s, p, d)

    def run(x: PackedSigns) -> PackedSigns:
        return binary_max_pool2d(x, k, s, p, d, backend=be)

    return LayerPlan(run, (b, oh, ow, c), "max-pool on packed channel words (AND)")


class BinaryMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no ceil_mode, no indices) that also pools packed channel words.

    ``x``: float ``(N, C, H, W)`` -> ``F.max_pool2d``; :class:`PackedSigns` of channel words
    (logical ``(N, H, W, C)``) -> pooled words, same kind. ``backend`` (None: auto) picks the
    word kernel.
    """

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                 dilation: IntPair = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = check_pool_geometry(
            kernel_size, stride, padding, dilation)
        self.backend: Optional[str] = None

    def inference_plan(self, x: Union[Tensor, PackedSigns], *, out_buffer: bool = False) -> LayerPlan:
        """The forward for ``x``'s signature (:mod:`kdengine.nn.plan`)."""
        if isinstance(x, PackedSigns):
            return word_pool_plan(x, self.kernel_size, self.stride, self.padding, self.dilation, self.backend)
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (N, C, H, W) tensor or packed channel words, got {type(x).__name__}")
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = pool_out_hw(tuple(x.shape[2:]), k, s, p, d)

        def run(x: Tensor) -> Tensor:
            return F.max_pool2d(x, k, s, p, d)

        return LayerPlan(run, (*x.shape[:2], oh, ow), "max-pool (float)")

    def forward(self, x: Union[Tensor, PackedSigns]) -> Union[Tensor, PackedSigns]:
        return self.inference_plan(x).run(x)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
