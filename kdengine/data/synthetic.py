"""Synthetic Gaussian-mixture classification data with grouped class centres (Tang et al. 2020,
docs/papers.md section 2).

Generative model (all draws from one seeded ``torch.Generator``, so a seed fixes the data):

* ``n_classes`` classes are split into ``n_groups`` contiguous groups (class ``c`` belongs to group
  ``c * n_groups // n_classes``);
* group centres ``g_k ~ N(0, group_scale^2 I_dim)``;
* class centres ``m_c = g_{group(c)} + N(0, class_scale^2 I_dim)``: classes of one group sit close
  together, so they are confusable with each other and not with other groups -- the "class
  relationship" structure a teacher can pass on (domain knowledge);
* examples ``x = m_y + noise_scale * eps``, ``eps ~ N(0, I_dim)``, balanced classes.

With the defaults the within-group classes overlap (a Bayes error of a few per cent to tens of per
cent depending on ``class_scale / noise_scale``) while groups are well separated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianMixture:
    """A generated data set. Tensors: ``x_*`` (N, dim) float32, ``y_*`` (N,) int64,
    ``centres`` (n_classes, dim), ``group_centres`` (n_groups, dim), ``groups`` (n_classes,) int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    centres: Tensor
    group_centres: Tensor
    groups: Tensor
    noise_scale: float

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test

    @property
    def n_classes(self) -> int:
        return int(self.centres.shape[0])

    def bayes_logits(self, x: Tensor) -> Tensor:
        """Log-posterior (up to a constant) of the true generative model: the Bayes-optimal
        classifier's logits ``-||x - m_c||^2 / (2 noise^2)`` (equal priors), shape (N, C)."""
        d2 = torch.cdist(x.to(self.centres.dtype), self.centres).pow(2)
        return -d2 / (2.0 * self.noise_scale ** 2)


def class_groups(n_classes: int, n_groups: int) -> Tensor:
    """Group id of every class: contiguous blocks, ``(n_classes,) int64``."""
    if n_groups < 1 or n_groups > n_classes:
        raise ValueError(f"n_groups must be in [1, n_classes={n_classes}], got {n_groups}")
    return torch.arange(n_classes) * n_groups // n_classes


def _check_pos_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_scale(name: str, v: object, allow_zero: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 or (allow_zero and v == 0)):
        raise ValueError(f"{name} must be a number >= 0{'' if allow_zero else ' (> 0)'}, got {v!r}")
    return float(v)


def gaussian_mixture(
    n_classes: int = 20,
    n_groups: int = 5,
    dim: int = 32,
    n_train_per_class: int = 100,
    n_test_per_class: int = 200,
    *,
    group_scale: float = 4.0,
    class_scale: float = 1.5,
    noise_scale: float = 1.0,
    seed: int = 0,
) -> GaussianMixture:
    """Draw a Gaussian-mixture data set with grouped class centres (see the module docstring).

    Args:
        n_classes, n_groups, dim: classes, groups of classes, input dimension.
        n_train_per_class, n_test_per_class: balanced example counts per class.
        group_scale: std of the group centres around 0.
        class_scale: std of class centres around their group centre (small = confusable).
        noise_scale: std of the examples around their class centre (> 0).
        seed: the generator seed; the same seed gives bitwise the same data.

    Returns:
        :class:`GaussianMixture`; train and test are shuffled (seeded).
    """
    for name, v in (("n_classes", n_classes), ("n_groups", n_groups), ("dim", dim),
                    ("n_train_per_class", n_train_per_class), ("n_test_per_class", n_test_per_class)):
        _check_pos_int(name, v)
    gs = _check_scale("group_scale", group_scale)
    cs = _check_scale("class_scale", class_scale)
    ns = _check_scale("noise_scale", noise_scale, allow_zero=False)
    groups = class_groups(n_classes, n_groups)
    g = torch.Generator().manual_seed(int(seed))
    group_centres = torch.randn(n_groups, dim, generator=g) * gs
    centres = group_centres[groups] + torch.randn(n_classes, dim, generator=g) * cs

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = centres[y] + torch.randn(y.numel(), dim, generator=g) * ns
        perm = torch.randperm(y.numel(), generator=g)
        return x[perm].float().contiguous(), y[perm].contiguous()

    x_tr, y_tr = draw(n_train_per_class)
    x_te, y_te = draw(n_test_per_class)
    return GaussianMixture(x_tr, y_tr, x_te, y_te, centres.float(), group_centres.float(), groups, ns)
