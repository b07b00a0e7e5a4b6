"""IE-KD: inheritance and exploration knowledge distillation (Huang et al., CVPR 2021; docs/papers.md s6).

1. An auto-encoder is trained on the teacher's last-stage features ``F`` with a reconstruction
   loss; its encoder output is the teacher's compact *factor* ``F_T``.
2. The student's last-stage features are split channel-wise in two halves (``natural``: first /
   second half; ``random``: a fixed seeded permutation, then halves). Each half has its own
   encoder: ``F_inh = E_inh(first half)``, ``F_exp = E_exp(second half)``, with ``F_T``'s channels.
3. With ``n(F) = vec(F) / ||vec(F)||_2`` per sample::

       L_inh =  mean |n(F_inh) - n(F_T)|      (inherit: be like the teacher)
       L_exp = -mean |n(F_exp) - n(F_T)|      (explore: be different from it)
       L     =  CE + l_inh * L_inh + l_exp * L_exp

   "mean" is over the batch and the factor's elements. Since the factors are unit vectors,
   ``L_exp >= -2 / sqrt(D)`` per sample: the exploration term is bounded and cannot run away.
4. IE-DML (:class:`IEDML`): two networks trained alternately, each the other's knowledge
   source: each network's factors come from an auto-encoder trained online on its own features,
   and the other network inherits from / explores away from them. The DML mimicry term
   ``KL(p_other || p_self)`` is kept (``dml_weight``; 0 gives the IE terms alone).

Choices not fixed by the sources (parameters, documented): the auto-encoder is
conv3x3-BN-ReLU-conv3x3 in each direction for ``(N, C, H, W)`` features (Linear layers for
``(N, C)`` features); its reconstruction loss is MSE; when the student's and teacher's factor
grids differ, both are average-pooled to the smaller grid; the odd channel of an odd ``C`` goes
to the exploration half.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdengine._checks import floating_tensor
from kdengine.methods.london import FeatureHooks
from kdengine.ops import kd_loss

__all__ = ["factor_normalize", "inheritance_loss", "exploration_loss", "FactorAutoEncoder",
           "train_autoencoder", "ChannelSplit", "IEKD", "IEDML"]


# --------------------------------------------------------------------------- losses


def factor_normalize(f: Tensor, eps: float = 1e-12) -> Tensor:
    """``n(f)``: flatten each sample of ``f`` (N, ...) to ``(N, D)`` and divide by its L2 norm."""
    f = floating_tensor("f", f)
    if f.dim() < 2 or f.numel() == 0:
        raise ValueError(f"f must be a non-empty (N, ...) batch of factors, got shape {tuple(f.shape)}")
    v = f.flatten(1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(eps)


def _match_grid(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the finer of two (N, C, H, W) factor maps to the coarser grid."""
    if a.dim() == 4 and b.dim() == 4 and a.shape[-2:] != b.shape[-2:]:
        h = min(a.shape[-2], b.shape[-2])
        w = min(a.shape[-1], b.shape[-1])
        a = F.adaptive_avg_pool2d(a, (h, w)) if a.shape[-2:] != (h, w) else a
        b = F.adaptive_avg_pool2d(b, (h, w)) if b.shape[-2:] != (h, w) else b
    return a, b


def _factor_distance(f_s: Tensor, f_t: Tensor, name: str) -> Tensor:
    if not isinstance(f_s, Tensor) or not isinstance(f_t, Tensor):
        raise TypeError(f"{name} and f_t must be torch.Tensor factors")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{name} and f_t must share the batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
    f_s, f_t = _match_grid(f_s, f_t)
    a, b = factor_normalize(f_s), factor_normalize(f_t)
    if a.shape != b.shape:
        raise ValueError(f"{name} and f_t must have the same factor size per sample, got "
                         f"{tuple(f_s.shape[1:])} and {tuple(f_t.shape[1:])}")
    return (a - b.to(a.dtype)).abs().mean()


def inheritance_loss(f_inh: Tensor, f_t: Tensor) -> Tensor:
    """``L_inh = mean |n(f_inh) - n(f_t)|`` (0-dim); ``f_t`` is used as given (detach it yourself)."""
    return _factor_distance(f_inh, f_t, "f_inh")


def exploration_loss(f_exp: Tensor, f_t: Tensor) -> Tensor:
    """``L_exp = -mean |n(f_exp) - n(f_t)|`` (0-dim, <= 0): minimising it pushes ``f_exp`` away."""
    return -_factor_distance(f_exp, f_t, "f_exp")


# --------------------------------------------------------------------------- modules


def _encoder(cin: int, cout: int, hidden: int, spatial: bool) -> nn.Sequential:
    if spatial:
        return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                             nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 3, padding=1))
    return nn.Sequential(nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, cout))


def _check_channels(name: str, c: object) -> int:
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"{name} must be a positive int, got {c!r}")
    return c


class FactorAutoEncoder(nn.Module):
    """Auto-encoder ``C -> factor_channels -> C`` whose code is the compact factor.

    Args:
        in_channels: C of the features (``(N, C, H, W)`` when ``spatial``, else ``(N, C)``).
        factor_channels: channels of the factor ``F_T``.
        hidden: width of the hidden layer (default ``max(in_channels, factor_channels)``).
        spatial: conv (3x3, same grid) for maps, Linear for vectors.
    """

    def __init__(self, in_channels: int, factor_channels: int, hidden: Optional[int] = None,
                 spatial: bool = True) -> None:
        super().__init__()
        c = _check_channels("in_channels", in_channels)
        k = _check_channels("factor_channels", factor_channels)
        h = max(c, k) if hidden is None else _check_channels("hidden", hidden)
        self.in_channels, self.factor_channels, self.spatial = c, k, bool(spatial)
        self.encoder = _encoder(c, k, h, self.spatial)
        self.decoder = _encoder(k, c, h, self.spatial)

    def _check(self, f: Tensor) -> Tensor:
        want = 4 if self.spatial else 2
        if not isinstance(f, Tensor) or f.dim() != want or f.shape[1] != self.in_channels:
            shape = "(N, C, H, W)" if self.spatial else "(N, C)"
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"features must be {shape} with C={self.in_channels}, got {got}")
        return f

    def encode(self, f: Tensor) -> Tensor:
        """The factor ``F_T``: ``(N, factor_channels, H, W)`` (or ``(N, factor_channels)``)."""
        return self.encoder(self._check(f))

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """``(reconstruction, factor)``."""
        z = self.encode(f)
        return self.decoder(z), z

    def reconstruction_loss(self, f: Tensor) -> Tensor:
        """MSE between ``f`` and its reconstruction (the auto-encoder's training loss)."""
        rec, _ = self(f)
        return F.mse_loss(rec, f)


def train_autoencoder(ae: FactorAutoEncoder, features: Iterable[Tensor], epochs: int = 1,
                      lr: float = 1e-3) -> list[float]:
    """Train ``ae`` on an iterable of feature batches (re-iterated each epoch) with Adam/MSE.

    ``features`` yields ``(N, C, ...)`` tensors (e.g. a frozen teacher's last-stage features;
    they are detached here). Returns the mean reconstruction loss of each epoch. Leaves ``ae``
    in eval mode.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    ae.train()
    hist = []
    for _ in range(epochs):
        tot, n = 0.0, 0
        for f in features:
            loss = ae.reconstruction_loss(f.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            n += 1
        if n == 0:
            raise ValueError("features yielded no batch")
        hist.append(tot / n)
    ae.eval()
    return hist


class ChannelSplit(nn.Module):
    """Split ``(N, C, ...)`` features channel-wise into (inheritance, exploration) halves.

    ``mode="natural"``: channels ``[0, C//2)`` and ``[C//2, C)``. ``mode="random"``: a fixed
    permutation drawn once from ``seed`` (stored as a buffer, so it is saved with the model),
    then the same halves of the permuted channels. Sizes: ``C//2`` and ``C - C//2``.
    """

    def __init__(self, channels: int, mode: str = "natural", seed: int = 0) -> None:
        super().__init__()
        c = _check_channels("channels", channels)
        if c < 2:
            raise ValueError(f"channels must be >= 2 to split in two, got {c}")
        if mode not in ("natural", "random"):
            raise ValueError(f"mode must be 'natural' or 'random', got {mode!r}")
        self.channels, self.mode = c, mode
        if mode == "natural":
            perm = torch.arange(c)
        else:
            perm = torch.randperm(c, generator=torch.Generator().manual_seed(int(seed)))
        h = c // 2
        self.register_buffer("inh_index", perm[:h].clone())
        self.register_buffer("exp_index", perm[h:].clone())

    @property
    def sizes(self) -> tuple[int, int]:
        return int(self.inh_index.numel()), int(self.exp_index.numel())

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(f, Tensor) or f.dim() < 2 or f.shape[1] != self.channels:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"features must be (N, {self.channels}, ...), got {got}")
        if self.mode == "natural":
            h = self.channels // 2
            return f[:, :h], f[:, h:]
        return f.index_select(1, self.inh_index), f.index_select(1, self.exp_index)


class IEKD(nn.Module):
    """The IE-KD student-side head: channel split, two encoders, and the loss.

    Args:
        student_channels: C of the student's last-stage features.
        factor_channels: channels of the teacher's factor (``teacher_ae.factor_channels``).
        split: ``"natural"`` or ``"random"``; ``seed`` fixes the random permutation.
        l_inh, l_exp: weights of ``L_inh`` and ``L_exp``.
        spatial: features are maps ``(N, C, H, W)`` (conv encoders) or vectors ``(N, C)``.
        hidden: encoder hidden width (default: the half's channel count, at least factor_channels).

    Its parameters (the two encoders) must be optimised together with the student's. Forward::

        total, parts = iekd(logits, labels, student_features, teacher_factor)

    ``teacher_factor`` is ``teacher_ae.encode(teacher_features)``; it is detached here.
    ``parts`` holds the detached floats ``ce``, ``inh``, ``exp``.
    """

    def __init__(self, student_channels: int, factor_channels: int, split: str = "natural",
                 seed: int = 0, l_inh: float = 50.0, l_exp: float = 10.0, spatial: bool = True,
                 hidden: Optional[int] = None) -> None:
        super().__init__()
        self.split = ChannelSplit(student_channels, split, seed)
        k = _check_channels("factor_channels", factor_channels)
        ci, ce = self.split.sizes
        self.enc_inh = _encoder(ci, k, hidden or max(ci, k), spatial)
        self.enc_exp = _encoder(ce, k, hidden or max(ce, k), spatial)
        self.l_inh, self.l_exp = float(l_inh), float(l_exp)
        if self.l_inh < 0 or self.l_exp < 0:
            raise ValueError(f"l_inh and l_exp must be >= 0, got {l_inh} and {l_exp}")

    def factors(self, student_features: Tensor) -> tuple[Tensor, Tensor]:
        """``(F_inh, F_exp)`` from the student's features."""
        a, b = self.split(student_features)
        return self.enc_inh(a), self.enc_exp(b)

    def ie_losses(self, student_features: Tensor, teacher_factor: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_inh, L_exp)`` against the (detached) teacher factor."""
        f_inh, f_exp = self.factors(student_features)
        f_t = teacher_factor.detach()
        return inheritance_loss(f_inh, f_t), exploration_loss(f_exp, f_t)

    def forward(self, logits: Tensor, labels: Tensor, student_features: Tensor,
                teacher_factor: Tensor) -> tuple[Tensor, dict[str, float]]:
        ce = F.cross_entropy(logits, labels)
        l_inh, l_exp = self.ie_losses(student_features, teacher_factor)
        total = ce + self.l_inh * l_inh + self.l_exp * l_exp
        return total, {"ce": float(ce.detach()), "inh": float(l_inh.detach()),
                       "exp": float(l_exp.detach())}


class IEDML:
    """IE-DML: two networks trained alternately, each the other's knowledge source.

    Args:
        net_a, net_b: classifiers ``x -> (N, classes)`` logits.
        layer_a, layer_b: names of the sub-modules whose outputs are the last-stage features.
        channels_a, channels_b: their channel counts.
        opt_a, opt_b: optimizers over ``net_a`` / ``net_b``; the IE encoders that ``net_a`` /
            ``net_b`` train are added to them as a new parameter group (same hyper-parameters).
        factor_channels: channels of each network's auto-encoder factor.
        l_inh, l_exp, split, seed, spatial: as in :class:`IEKD`.
        dml_weight: weight of the DML mimicry term ``KL(p_other || p_self)`` at T = 1.
        ae_lr: Adam learning rate of the two online auto-encoders.

    :meth:`step` (one batch): the auto-encoder of B takes a reconstruction step on B's current
    features, and its code in that step (batch statistics) is B's factor; A takes a step on
    ``CE + IE(A, factor_B) + dml * KL(p_B || p_A)``; then the same with the roles swapped, B
    learning from the *updated* A. Returns floats ``loss_a``,
    ``loss_b``, ``rec_a``, ``rec_b``.
    """

    def __init__(self, net_a: nn.Module, net_b: nn.Module, layer_a: str, layer_b: str,
                 channels_a: int, channels_b: int, opt_a: torch.optim.Optimizer,
                 opt_b: torch.optim.Optimizer, *, factor_channels: int = 8, l_inh: float = 50.0,
                 l_exp: float = 10.0, split: str = "natural", seed: int = 0, spatial: bool = True,
                 dml_weight: float = 1.0, ae_lr: float = 1e-3) -> None:
        if not (float(dml_weight) >= 0):
            raise ValueError(f"dml_weight must be >= 0, got {dml_weight!r}")
        self.nets = (net_a, net_b)
        self.hooks = (FeatureHooks(net_a, [layer_a]), FeatureHooks(net_b, [layer_b]))
        self.opts = (opt_a, opt_b)
        dev = next(net_a.parameters()).device
        self.aes = (FactorAutoEncoder(channels_a, factor_channels, spatial=spatial).to(dev),
                    FactorAutoEncoder(channels_b, factor_channels, spatial=spatial).to(dev))
        self.ae_opts = tuple(torch.optim.Adam(ae.parameters(), lr=ae_lr) for ae in self.aes)
        # heads[i]: the IE head that net i trains, learning from the other net's factors.
        self.heads = (IEKD(channels_a, factor_channels, split, seed, l_inh, l_exp, spatial).to(dev),
                      IEKD(channels_b, factor_channels, split, seed + 1, l_inh, l_exp, spatial).to(dev))
        for opt, head in zip(self.opts, self.heads):
            opt.add_param_group({"params": list(head.parameters())})
        self.dml_weight = float(dml_weight)

    def _source(self, j: int, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """Net j as the knowledge source: its logits, its factor (both detached), AE step."""
        net, hooks, ae, opt = self.nets[j], self.hooks[j], self.aes[j], self.ae_opts[j]
        with torch.no_grad():
            logits = net(x)
            feat = hooks.features[0].detach()
        hooks.clear()
        # The factor comes from the same batch-statistics pass as the reconstruction step. An
        # eval-mode encode would use BatchNorm running statistics that lag far behind the
        # features of a network that is itself still training (they start at mean 0, var 1 and
        # move by 10 % a step); early on that factor is nearly the same unit vector for every
        # image, and inheriting it drives the learner's features to a constant (a peer at chance).
        ae.train()
        rec_f, z = ae(feat)
        rec = F.mse_loss(rec_f, feat)
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        return logits, z.detach(), float(rec.detach())

    def _learn(self, i: int, x: Tensor, y: Tensor, src_logits: Tensor, src_factor: Tensor) -> float:
        net, hooks, head, opt = self.nets[i], self.hooks[i], self.heads[i], self.opts[i]
        logits = net(x)
        feat = hooks.features[0]
        hooks.clear()
        loss, _ = head(logits, y, feat, src_factor)
        if self.dml_weight > 0:
            loss = loss + self.dml_weight * kd_loss(logits, src_logits, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One alternating round on the batch ``(x, y)``."""
        lb, fb, rec_b = self._source(1, x)
        loss_a = self._learn(0, x, y, lb, fb)
        la, fa, rec_a = self._source(0, x)
        loss_b = self._learn(1, x, y, la, fa)
        return {"loss_a": loss_a, "loss_b": loss_b, "rec_a": rec_a, "rec_b": rec_b}

    def remove(self) -> None:
        """Drop the feature hooks."""
        for h in self.hooks:
            h.remove()
