"""The C++ kernels really run on several threads, and their results do not depend on how many.

The CPU extension is compiled without OpenMP, so ``at::parallel_for`` would silently run serially
in it; every kernel goes through ``kdengine::parallel_for`` (csrc/common/parallel.h) instead. These
tests pin both halves: the loop helper spreads work over two threads (checked through a test hook
that reports which thread ran each index), and every op gives bitwise the same result with 1 and 2
threads on sizes large enough to be split (and, where the op is exact, equals the reference).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import kdengine
from kdengine import _dispatch, testing
from kdengine.ops import (
    binary_conv2d,
    binary_linear,
    if_multistep,
    pack_signs,
    pack_spikes,
    spike_matmul,
    xnor_matmul,
)

pytestmark = pytest.mark.skipif(
    not _dispatch.backend_availability("cpu", "cpu").available,
    reason=f"cpu backend: {_dispatch.backend_availability('cpu', 'cpu').reason}",
)


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _probe(n: int, grain: int, dynamic: bool = False) -> torch.Tensor:
    return testing.parallel_probe(n, grain, dynamic)


@pytest.mark.parametrize("n,grain", [(2, 1), (10, 1), (1001, 64), (97, 13)])
def test_parallel_for_uses_two_threads(n, grain):
    with _threads(2):
        owner = _probe(n, grain)
    assert (owner >= 0).all(), "an index was never visited"
    assert set(owner.tolist()) == {0, 1}, f"expected 2 threads to share the work, got {owner.unique()}"
    # Each thread got one contiguous range, and the first range is at least one grain long.
    changes = int((owner[1:] != owner[:-1]).sum())
    assert changes == 1
    first = int((owner == owner[0]).sum())
    assert first >= min(grain, n)


@pytest.mark.parametrize("n,grain", [(0, 1), (1, 1), (10, 10), (10, 100)])
def test_parallel_for_small_work_stays_on_one_thread(n, grain):
    with _threads(2):
        owner = _probe(n, grain)
    assert owner.numel() == n
    assert (owner == 0).all()


@pytest.mark.parametrize("n,chunk", [(1, 1), (10, 3), (1001, 64), (97, 200)])
@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_for_dynamic_covers_each_index_once_in_whole_chunks(n, chunk, threads):
    """Chunks pulled from a shared counter: every index visited exactly once (the hook raises on a
    second visit), and each chunk [c*chunk, (c+1)*chunk) run by a single thread."""
    with _threads(threads):
        owner = _probe(n, chunk, True)
    assert (owner >= 0).all()
    assert owner.max() < threads
    for c0 in range(0, n, chunk):
        assert owner[c0:c0 + chunk].unique().numel() == 1


def test_parallel_for_one_thread():
    with _threads(1):
        owner = _probe(1000, 1)
    assert (owner == 0).all()


def _both(fn):
    with _threads(1):
        one = fn()
    with _threads(2):
        two = fn()
    return one, two


def _assert_same(one, two):
    if isinstance(one, (tuple, list)):
        for a, b in zip(one, two):
            _assert_same(a, b)
        return
    assert one.dtype == two.dtype and one.shape == two.shape
    assert torch.equal(one, two) or (one.isnan() == two.isnan()).all() and torch.equal(
        one.nan_to_num(), two.nan_to_num()
    )


@pytest.mark.parametrize("m,n,k", [(300, 257, 4096 + 7), (1, 1031, 999), (131, 3, 65)])
def test_xnor_and_spike_matmul_thread_invariant(m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g)
    s = (torch.rand(m, k, generator=g) < 0.3).float()
    pa, pb, ps = pack_signs(a), pack_signs(b), pack_spikes(s)
    one, two = _both(lambda: (xnor_matmul(pa, pb, backend="cpu"), spike_matmul(ps, pb, backend="cpu")))
    _assert_same(one, two)
    assert torch.equal(two[0], xnor_matmul(pa, pb, backend="reference"))
    assert torch.equal(two[1], spike_matmul(ps, pb, backend="reference"))


def test_binary_linear_and_conv_thread_invariant():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 1029, generator=g)
    w = pack_signs(torch.randn(513, 1029, generator=g))
    scale, bias = torch.rand(513, generator=g), torch.randn(513, generator=g)
    one, two = _both(lambda: binary_linear(x, w, scale, bias, backend="cpu"))
    _assert_same(one, two)
    torch.testing.assert_close(two, binary_linear(x, w, scale, bias, backend="reference"))

    xc = torch.randn(3, 19, 23, 29, generator=g)
    wc = pack_signs(torch.randn(17, 19 * 3 * 3, generator=g))
    conv = lambda: binary_conv2d(xc, wc, 3, padding=1, stride=(1, 2), backend="cpu")  # noqa: E731
    one, two = _both(conv)
    _assert_same(one, two)
    torch.testing.assert_close(two, binary_conv2d(xc, wc, 3, padding=1, stride=(1, 2), backend="reference"))


@pytest.mark.parametrize("v_reset", [None, 0.0])
def test_if_multistep_thread_invariant(v_reset):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, 50_021, generator=g)

    def run():
        xx = x.clone().requires_grad_(True)
        s, v = if_multistep(xx, 1.0, v_reset, return_v=True, backend="cpu")
        (s * torch.linspace(-1, 1, s.shape[-1])).sum().add(v.sum()).backward()
        return s.detach(), v.detach(), xx.grad

    one, two = _both(run)
    _assert_same(one, two)


def test_kd_loss_thread_invariant():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(67, 4099, generator=g)
    t = torch.randn(67, 4099, generator=g)

    def run():
        ss = s.clone().requires_grad_(True)
        loss = kdengine.kd_loss(ss, t, temperature=2.0, backend="cpu")
        loss.backward()
        return loss.detach(), ss.grad

    one, two = _both(run)
    _assert_same(one, two)
