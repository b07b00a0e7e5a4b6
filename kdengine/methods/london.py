"""LONDON: Lipschitz continuity guided knowledge distillation (Shang et al., ICCV 2021; docs/papers.md s4).

The idea: a network's Lipschitz constant is bounded by the product of its layers' constants, and a
layer's constant can be estimated from the features it maps. For two consecutive feature maps
``F_i`` (N, C_i, H_i, W_i) and ``F_{i+1}`` (N, C_{i+1}, H, W) of one sample the *transmitting
matrix* is::

    P_i  = adaptive_avg_pool(F_i, (H, W))                  # bring F_i to F_{i+1}'s grid
    TM_i = P_i F_{i+1}^T / (H W)        (C_i x C_{i+1})     # flattened over the H W positions

and ``sigma_i = ||TM_i||_2`` (its top singular value) is the estimate. The student learns to match
the teacher's per-sample ``sigma`` of every consecutive pair::

    L_london = sum_i w_i * mean_n (sigma^S_{n,i} - sigma^T_{n,i})^2

Teacher and student may have different channel counts: sigma is a scalar per sample and pair, so
only the *number* of tapped layers has to agree.

Spectral norm with a gradient. The first release of the authors' code computed sigma under
``no_grad``, so its Lipschitz term never reached the student; the authors fixed that in September
2021, and their current code, like this one, trains through sigma. Here the power iteration on
``TM TM^T`` runs without gradient only to find the top singular vectors ``u, v``; then
``sigma = u^T TM v`` is evaluated *with* gradient. At convergence ``d sigma / d TM = u v^T``,
which is exactly the gradient of the top singular value, so nothing is lost by not
differentiating through the iterations.

Weights (the paper only says deeper pairs count more; its exact schedule is unconfirmed): the
default is a linear ramp ``w_i = (i + 1) / sum_j (j + 1)`` over the ``P`` pairs, shallow to deep,
which sums to 1. Pass ``weights=`` to choose others.

Features come from forward hooks on named modules (:class:`FeatureHooks`), so any model works.

The paper's stack (its released code builds on OFD, Heo et al. 2019): pre-ReLU features; the student's
go through :func:`build_connector` (1x1 conv + BN, to the teacher's width) before both losses; the
OFD margin loss (:func:`ofd_distillation_loss`, margins :func:`gaussian_margin` /
:func:`margin_from_bn` / :func:`margin_from_features`); layer weights that halve per step towards the
input (:func:`geometric_layer_weights`, :func:`geometric_pair_weights`); and the Lipschitz weight
``alpha`` cut to a quarter for the last 40 % of the epochs (:func:`london_alpha`). Their loss is
``CE + beta * distill / (B * 1000) + alpha(epoch) * L_london / 200`` (:func:`ofd_london_losses`
returns the two parts).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine._checks import floating_tensor

__all__ = [
    "FeatureHooks",
    "transmitting_matrix",
    "spectral_norm",
    "lipschitz_profile",
    "default_pair_weights",
    "lipschitz_matching_loss",
    "london_loss",
    "LondonLoss",
    "gaussian_margin",
    "margin_from_bn",
    "margin_from_features",
    "ofd_distillation_loss",
    "build_connector",
    "geometric_layer_weights",
    "geometric_pair_weights",
    "london_alpha",
    "ofd_london_losses",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- feature hooks


class FeatureHooks:
    """Capture the outputs of named sub-modules with forward hooks.

    ``hooks = FeatureHooks(model, ["layer1", "layer2.0.conv"])``; after ``model(x)``,
    ``hooks.features`` is the list of captured outputs in the order of ``names`` (tensors that
    carry the graph, so losses on them back-propagate into ``model``). Each forward pass
    overwrites the previous capture. Use as a context manager, or call :meth:`remove`.

    A module whose output is a tuple/list contributes its first element.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError("names must be a sequence of sub-module names (e.g. ['layer1', 'layer2'])")
        names = list(names)
        if not names:
            raise ValueError("names must name at least one sub-module")
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            avail = [n for n in modules if n][:20]
            raise ValueError(f"no sub-module named {missing} in {type(model).__name__}; "
                             f"some available names: {avail}")
        self.names = names
        self._store: dict[str, Tensor] = {}
        self._handles = []
        for n in names:
            self._handles.append(modules[n].register_forward_hook(self._make_hook(n)))

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inp, out) -> None:
            if isinstance(out, (tuple, list)):
                out = out[0]
            self._store[name] = out
        return hook

    @property
    def features(self) -> list[Tensor]:
        """Captured outputs, in the order of ``names``; raises if a forward pass is missing."""
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(f"no features captured for {missing}: run a forward pass first")
        return [self._store[n] for n in self.names]

    def clear(self) -> None:
        """Drop the captured tensors (and the graphs they hold)."""
        self._store.clear()

    def remove(self) -> None:
        """Unregister every hook and drop the captures."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --------------------------------------------------------------------------- math


def _check_feature(name: str, f: object) -> Tensor:
    f = floating_tensor(name, f, _FLOATS)
    if f.dim() not in (2, 4):
        raise ValueError(f"{name} must be (N, C) or (N, C, H, W), got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(f.shape)})")
    return f


def transmitting_matrix(f_in: Tensor, f_out: Tensor) -> Tensor:
    """Per-sample transmitting matrix between two consecutive feature maps.

    Args:
        f_in: ``(N, C_i, H_i, W_i)`` (or ``(N, C_i)``, read as H = W = 1) features entering a block.
        f_out: ``(N, C_o, H, W)`` (or ``(N, C_o)``) the features it produces; ``H <= H_i`` and
            ``W <= W_i`` (``f_in`` is average-pooled down to ``f_out``'s grid, never upsampled).

    Returns:
        ``(N, C_i, C_o)`` in the promoted floating dtype (fp32 math for half inputs):
        ``TM[n] = pool(f_in)[n] f_out[n]^T / (H W)`` with both flattened to ``(C, H W)``.
    """
    f_in = _check_feature("f_in", f_in)
    f_out = _check_feature("f_out", f_out)
    if f_in.shape[0] != f_out.shape[0]:
        raise ValueError(f"f_in and f_out must share the batch size, got {f_in.shape[0]} and "
                         f"{f_out.shape[0]}")
    if f_in.device != f_out.device:
        raise ValueError(f"f_in is on {f_in.device} but f_out on {f_out.device}")
    if f_in.dim() == 2:
        f_in = f_in[:, :, None, None]
    if f_out.dim() == 2:
        f_out = f_out[:, :, None, None]
    h, w = f_out.shape[-2:]
    if f_in.shape[-2] < h or f_in.shape[-1] < w:
        raise ValueError(
            f"f_in's spatial size {tuple(f_in.shape[-2:])} is smaller than f_out's {(h, w)}: the "
            f"pair must be ordered shallow -> deep (pooling does not upsample)"
        )
    dt = torch.promote_types(f_in.dtype, f_out.dtype)
    if dt in (torch.float16, torch.bfloat16):
        dt = torch.float32  # the C x C products accumulate H W terms: keep fp32 math
    if f_in.shape[-2:] != (h, w):
        f_in = F.adaptive_avg_pool2d(f_in, (h, w))
    a = f_in.to(dt).flatten(2)            # (N, C_i, HW)
    b = f_out.to(dt).flatten(2)           # (N, C_o, HW)
    return torch.bmm(a, b.transpose(1, 2)) / float(h * w)


def _start_vector(rows: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Fixed (seeded) start, independent of the global RNG so the loss is deterministic. Entries are
    # positive: post-ReLU features give a non-negative TM whose top singular vector is non-negative
    # (Perron-Frobenius), so a positive start always overlaps it well.
    g = torch.Generator().manual_seed(0x10D0)
    u = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    return (u / u.norm()).to(dtype=dtype, device=device).expand(batch, rows).contiguous()


def spectral_norm(tm: Tensor, n_iter: int = 10, eps: float = 1e-12,
                  return_vectors: bool = False):
    """Top singular value of each matrix in a batch, differentiable in ``tm``.

    Power iteration on ``tm tm^T`` (``n_iter`` steps, no gradient) gives the top left/right
    singular vectors ``u`` (N, R) and ``v`` (N, K); then ``sigma = u^T tm v`` is computed with
    gradient, so ``d sigma / d tm = u v^T`` reaches whatever produced ``tm``.

    Args:
        tm: ``(N, R, K)`` (or one ``(R, K)`` matrix) floating tensor.
        n_iter: power-iteration steps (>= 1); the error of sigma shrinks like
            ``(sigma_2 / sigma_1)^(4 n_iter)``.
        eps: guards the normalisations (an all-zero matrix gives sigma = 0, not NaN).
        return_vectors: also return ``(u, v)``.

    Returns:
        ``sigma`` of shape ``(N,)`` (0-dim for a single matrix), and ``(u, v)`` if asked.
    """
    tm = floating_tensor("tm", tm, _FLOATS)
    if tm.dim() not in (2, 3):
        raise ValueError(f"tm must be (N, R, K) or (R, K), got shape {tuple(tm.shape)}")
    if tm.shape[-1] == 0 or tm.shape[-2] == 0:
        raise ValueError(f"tm has an empty dimension: shape {tuple(tm.shape)}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    single = tm.dim() == 2
    m = tm.unsqueeze(0) if single else tm
    n, r, _ = m.shape
    with torch.no_grad():
        md = m.detach()
        u = _start_vector(r, n, md.dtype, md.device)
        for _ in range(n_iter):
            v = torch.bmm(md.transpose(1, 2), u.unsqueeze(-1)).squeeze(-1)   # TM^T u
            u = torch.bmm(md, v.unsqueeze(-1)).squeeze(-1)                   # TM TM^T u
            u = u / u.norm(dim=1, keepdim=True).clamp_min(eps)
        v = torch.bmm(md.transpose(1, 2), u.unsqueeze(-1)).squeeze(-1)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(eps)
    sigma = torch.einsum("nr,nrk,nk->n", u, m, v)
    if single:
        sigma, u, v = sigma[0], u[0], v[0]
    return (sigma, (u, v)) if return_vectors else sigma


def lipschitz_profile(features: Sequence[Tensor], n_iter: int = 10) -> Tensor:
    """Per-sample spectral norms of the transmitting matrices of consecutive features.

    Args:
        features: ``L >= 2`` feature maps, shallow to deep, each ``(N, C, H, W)`` or ``(N, C)``.
        n_iter: power-iteration steps.

    Returns:
        ``(N, L - 1)``: column ``i`` is ``sigma(TM(features[i], features[i+1]))``.
    """
    if isinstance(features, Tensor) or not isinstance(features, Sequence):
        raise TypeError("features must be a list of tensors (shallow to deep)")
    if len(features) < 2:
        raise ValueError(f"features must hold at least 2 feature maps to form a pair, got {len(features)}")
    sig = [spectral_norm(transmitting_matrix(a, b), n_iter=n_iter)
           for a, b in zip(features[:-1], features[1:])]
    return torch.stack(sig, dim=1)


def default_pair_weights(n_pairs: int) -> list[float]:
    """Linear ramp ``w_i = (i + 1) / sum_j (j + 1)``: deeper pairs weigh more, weights sum to 1."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    tot = n_pairs * (n_pairs + 1) / 2
    return [(i + 1) / tot for i in range(n_pairs)]


def _pair_weights(weights: Optional[Sequence[float]], p: int) -> list[float]:
    if weights is None:
        return default_pair_weights(p)
    w = [float(x) for x in weights]
    if len(w) != p:
        raise ValueError(f"weights must have one entry per consecutive pair ({p}), got {len(w)}")
    if any(not (x >= 0) for x in w):
        raise ValueError(f"weights must be non-negative numbers, got {w}")
    return w


def lipschitz_matching_loss(student_sigma: Tensor, teacher_sigma: Tensor,
                            weights: Optional[Sequence[float]] = None) -> Tensor:
    """``sum_i w_i mean_n (student_sigma[n, i] - teacher_sigma[n, i])^2`` on precomputed profiles.

    Args:
        student_sigma: ``(N, P)`` from :func:`lipschitz_profile` (with gradient).
        teacher_sigma: ``(N, P)`` target profile (e.g. cached once per training example for a
            frozen teacher; detached here).
        weights: ``P`` non-negative pair weights; default :func:`default_pair_weights`.
    """
    for name, t in (("student_sigma", student_sigma), ("teacher_sigma", teacher_sigma)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (N, P) tensor of per-pair sigmas")
    if student_sigma.shape[0] != teacher_sigma.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {student_sigma.shape[0]} vs "
                         f"{teacher_sigma.shape[0]}")
    if student_sigma.shape[1] != teacher_sigma.shape[1]:
        raise ValueError(f"student and teacher profiles have {student_sigma.shape[1]} and "
                         f"{teacher_sigma.shape[1]} pairs; tap the same number of layers")
    w = _pair_weights(weights, student_sigma.shape[1])
    wt = torch.tensor(w, dtype=student_sigma.dtype, device=student_sigma.device)
    diff = student_sigma - teacher_sigma.detach().to(student_sigma.dtype)
    return (wt * diff.pow(2).mean(0)).sum()   # MSE over the batch, weighted over pairs


def london_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    weights: Optional[Sequence[float]] = None,
    n_iter: int = 10,
) -> Tensor:
    """LONDON's Lipschitz-matching loss ``sum_i w_i MSE(sigma^S_i, sigma^T_i)``.

    Args:
        student_features: ``L`` student feature maps, shallow to deep (``(N, C, H, W)`` / ``(N, C)``).
        teacher_features: ``L`` teacher feature maps at the matching depths (channel counts and
            spatial sizes may differ from the student's). Detached here: the teacher is a target.
        weights: ``L - 1`` non-negative pair weights; default :func:`default_pair_weights`.
        n_iter: power-iteration steps.

    Returns:
        0-dim loss in the student's math dtype (fp32 for half inputs); differentiable in the
        student features.
    """
    if isinstance(student_features, Tensor) or isinstance(teacher_features, Tensor):
        raise TypeError("student_features and teacher_features must be lists of tensors")
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"student_features and teacher_features must tap the same number of layers, got "
            f"{len(student_features)} and {len(teacher_features)}"
        )
    s_sig = lipschitz_profile(student_features, n_iter)
    with torch.no_grad():
        t_sig = lipschitz_profile([f.detach() for f in teacher_features], n_iter)
    return lipschitz_matching_loss(s_sig, t_sig, weights)


class LondonLoss(nn.Module):
    """LONDON loss between a student and a teacher, features taken by hooks on named modules.

    ``LondonLoss(student, teacher, student_layers, teacher_layers, weights=None, n_iter=10)``
    registers hooks; after both models ran a forward pass on the same batch, ``loss_fn()``
    returns :func:`london_loss` on the captured features. Call :meth:`remove` (or use it as a
    context manager) to drop the hooks. The module holds no parameters.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: Sequence[str],
                 teacher_layers: Sequence[str], weights: Optional[Sequence[float]] = None,
                 n_iter: int = 10) -> None:
        super().__init__()
        if len(list(student_layers)) != len(list(teacher_layers)):
            raise ValueError(
                f"student_layers and teacher_layers must have the same length, got "
                f"{len(list(student_layers))} and {len(list(teacher_layers))}"
            )
        if len(list(student_layers)) < 2:
            raise ValueError("tap at least 2 layers per model (one consecutive pair)")
        self._s = FeatureHooks(student, student_layers)
        self._t = FeatureHooks(teacher, teacher_layers)
        self.weights = None if weights is None else list(weights)
        if self.weights is not None and len(self.weights) != len(list(student_layers)) - 1:
            raise ValueError(f"weights must have {len(list(student_layers)) - 1} entries (one per pair), "
                             f"got {len(self.weights)}")
        self.n_iter = n_iter

    def forward(self) -> Tensor:
        loss = london_loss(self._s.features, self._t.features, self.weights, self.n_iter)
        self._s.clear()
        self._t.clear()
        return loss

    def student_profile(self) -> Tensor:
        """``(N, L - 1)`` sigmas of the last captured student forward (detached)."""
        with torch.no_grad():
            return lipschitz_profile([f.detach() for f in self._s.features], self.n_iter)

    def remove(self) -> None:
        self._s.remove()
        self._t.remove()

    def __enter__(self) -> "LondonLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --------------------------------------------------------------------------- OFD stack


def gaussian_margin(mean: Tensor, std: Tensor) -> Tensor:
    """OFD's per-channel margin: ``E[x | x < 0]`` for ``x ~ N(mean, std^2)``.

    ``m - s phi(m/s) / Phi(-m/s)``; where ``Phi(-m/s) <= 0.001`` (a channel almost never negative)
    the conditional mean is numerically unstable, so OFD falls back to ``-3 s``, as here.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64)
    s = torch.as_tensor(std, dtype=torch.float64).abs().clamp_min(1e-12)
    z = mean / s
    cdf = 0.5 * torch.erfc(z / math.sqrt(2.0))                 # Phi(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    m = mean - s * pdf / cdf.clamp_min(1e-300)
    return torch.where(cdf > 1e-3, m, -3.0 * s)


def margin_from_bn(bn: nn.Module) -> Tensor:
    """Margin of the pre-ReLU output of a BatchNorm layer (``N(bias, weight^2)`` per channel)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
        raise TypeError("bn must be an affine BatchNorm layer")
    return gaussian_margin(bn.bias.detach().double(), bn.weight.detach().double()).float()


def margin_from_features(f: Tensor) -> Tensor:
    """Margin from pre-ReLU features ``(N, C, ...)`` of a layer without BN: the per-channel mean and
    std over the batch and positions stand in for the BN parameters of :func:`margin_from_bn`."""
    f = _check_feature("f", f)
    flat = f.detach().double().transpose(0, 1).reshape(f.shape[1], -1)
    return gaussian_margin(flat.mean(1), flat.std(1)).float()


def ofd_distillation_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2, summed over every element: ``(s - t')^2`` with ``t' = max(t, margin)``,
    skipped where ``s <= t'`` and ``t' <= 0`` (both sides below zero: the ReLU would zero them
    anyway, so the student need not copy how negative the teacher is).

    Args:
        source: ``(N, C, ...)`` the student's connector output.
        target: the teacher's pre-ReLU features, same shape (detached here).
        margin: ``(C,)`` per-channel margins (broadcast over batch and positions).
    """
    if source.shape != target.shape:
        raise ValueError(f"source and target shapes differ: {tuple(source.shape)} vs {tuple(target.shape)}")
    margin = torch.as_tensor(margin, dtype=source.dtype, device=source.device)
    if margin.dim() != 1 or margin.numel() != source.shape[1]:
        raise ValueError(f"margin must hold one value per channel ({source.shape[1]}), got {tuple(margin.shape)}")
    t = torch.max(target.detach().to(source.dtype), margin.view(1, -1, *([1] * (source.dim() - 2))))
    mask = (source > t) | (t > 0)
    return ((source - t).pow(2) * mask).sum()


def build_connector(student_channels: int, teacher_channels: int, spatial: bool = True) -> nn.Sequential:
    """OFD's connector: 1x1 conv (no bias) + BN to the teacher's width, He-normal init (fan-out),
    BN at identity; ``spatial=False`` gives Linear + BatchNorm1d for ``(N, C)`` features."""
    if spatial:
        lin: nn.Module = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        bn: nn.Module = nn.BatchNorm2d(teacher_channels)
    else:
        lin = nn.Linear(student_channels, teacher_channels, bias=False)
        bn = nn.BatchNorm1d(teacher_channels)
    nn.init.normal_(lin.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(lin, bn)


def geometric_layer_weights(n_layers: int) -> list[float]:
    """OFD's per-layer weights ``1 / 2^(L - 1 - i)``: the deepest layer 1, halving towards the input."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return [2.0 ** -(n_layers - 1 - i) for i in range(n_layers)]


def geometric_pair_weights(n_pairs: int) -> list[float]:
    """The authors' Lipschitz pair weights: pair ``i`` (layers ``i, i+1`` of ``P + 1``) gets
    ``1 / 2^(P - i)``, the deepest pair 1/2, halving towards the input."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    return [2.0 ** -(n_pairs - i) for i in range(n_pairs)]


def london_alpha(epoch: int, epochs: int, alpha: float, switch: float = 0.6, factor: float = 0.25) -> float:
    """The authors' schedule of the Lipschitz weight: ``alpha`` before ``switch * epochs``, then
    ``factor * alpha`` (0-based ``epoch``)."""
    if epochs < 1 or epoch < 0:
        raise ValueError(f"need epochs >= 1 and epoch >= 0, got {epoch}, {epochs}")
    return float(alpha) if epoch < switch * epochs else float(factor) * float(alpha)


def ofd_london_losses(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor],
                      connectors: Sequence[nn.Module], margins: Sequence[Tensor],
                      n_iter: int = 10) -> tuple[Tensor, Tensor]:
    """``(distill, lipschitz)`` of OFD + LONDON on one batch.

    The student's features pass through their connectors first; ``distill = sum_i w_i
    ofd_distillation_loss(...) / N`` with :func:`geometric_layer_weights`, and ``lipschitz`` is
    :func:`london_loss` between the connector outputs and the teacher's features, with
    :func:`geometric_pair_weights`. The caller scales them (the paper: ``/ 1000`` and
    ``alpha / 200``).
    """
    n = len(teacher_features)
    if not (len(student_features) == len(connectors) == len(margins) == n) or n < 2:
        raise ValueError("need at least 2 layers and one student feature, connector and margin per "
                         "teacher feature")
    s = [c(f) for c, f in zip(connectors, student_features)]
    w = geometric_layer_weights(n)
    batch = s[0].shape[0]
    distill = sum(wi * ofd_distillation_loss(a, b, m) for wi, a, b, m in zip(w, s, teacher_features, margins))
    lip = london_loss(s, teacher_features, geometric_pair_weights(n - 1), n_iter)
    return distill / batch, lip
