"""The output reuse pool of the C++ kernels (csrc/common/output_pool.h, kdengine.cpu_pool): freed large
outputs are handed out again, live ones never are, results are always freshly computed, and the
limit / clear controls work."""
from __future__ import annotations

import pytest
import torch

from kdengine import _dispatch, cpu_pool
from kdengine.ops import if_multistep
from kdengine.ops.if_multistep.reference import if_multistep_reference

pytestmark = pytest.mark.skipif(
    not _dispatch.backend_availability("cpu", "cpu").available,
    reason=f"cpu backend: {_dispatch.backend_availability('cpu', 'cpu').reason}",
)

SHAPE = (4, 1 << 20)  # 16 MB of fp32 spikes: above the pool's 8 MB floor


@pytest.fixture
def pool_on():
    old = cpu_pool.set_limit(1 << 30)
    cpu_pool.clear()
    yield
    cpu_pool.clear()
    cpu_pool.set_limit(old)


def _x(seed):
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.3


def _ref(x):
    return if_multistep_reference(x, 1.0, None, None, "atan", 2.0, False)[0]


def test_freed_output_is_reused_and_recomputed(pool_on):
    x1, x2 = _x(1), _x(2)
    with torch.no_grad():
        s1 = if_multistep(x1, backend="cpu")
        ptr = s1.data_ptr()
        assert torch.equal(s1, _ref(x1))
        before = cpu_pool.stats()
        del s1
        assert cpu_pool.stats().held_bytes >= SHAPE[0] * SHAPE[1] * 4  # back in the pool
        s2 = if_multistep(x2, backend="cpu")
    after = cpu_pool.stats()
    assert s2.data_ptr() == ptr and after.hits == before.hits + 1
    assert torch.equal(s2, _ref(x2))  # the reused block holds the new call's spikes


def test_live_outputs_are_never_shared(pool_on):
    x = _x(3)
    with torch.no_grad():
        outs = [if_multistep(x, backend="cpu") for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    expected = _ref(x)
    assert all(torch.equal(o, expected) for o in outs)


def test_backward_gradient_comes_from_the_pool_and_is_right(pool_on):
    x = _x(4).requires_grad_(True)
    g = torch.randn(*SHAPE)
    for _ in range(2):
        x.grad = None
        (if_multistep(x, backend="cpu") * g).sum().backward()
        xr = x.detach().clone().requires_grad_(True)
        (if_multistep(xr, backend="reference") * g).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert cpu_pool.stats().hits >= 1


def test_limit_zero_disables_and_clear_frees(pool_on):
    x = _x(5)
    with torch.no_grad():
        del_me = if_multistep(x, backend="cpu")
        del del_me
    assert cpu_pool.stats().held_bytes > 0
    assert cpu_pool.clear() > 0 and cpu_pool.stats().held_bytes == 0
    cpu_pool.set_limit(0)
    misses = cpu_pool.stats().misses
    with torch.no_grad():
        s = if_multistep(x, backend="cpu")
        del s
    st = cpu_pool.stats()
    assert st.held_bytes == 0 and st.misses == misses and st.limit_bytes == 0
    with pytest.raises(ValueError, match="limit_bytes"):
        cpu_pool.set_limit(-1)


def test_kd_loss_gradient_buffer_from_the_pool(pool_on):
    """kd_loss writes the student gradient (N x V) in the forward; at >= 8 MB it comes from the
    pool, and a step after the previous gradient was freed reuses it with correct values."""
    import kdengine

    g = torch.Generator().manual_seed(7)
    t = torch.randn(300, 8000, generator=g)
    ptrs = []
    for _step in range(2):
        s = torch.randn(300, 8000, generator=g).requires_grad_(True)
        kdengine.kd_loss(s, t, temperature=2.0, backend="cpu").backward()
        sr = s.detach().clone().requires_grad_(True)
        kdengine.kd_loss(sr, t, temperature=2.0, backend="reference").backward()
        torch.testing.assert_close(s.grad, sr.grad, rtol=1e-5, atol=1e-7)
        ptrs.append(s.grad.data_ptr())
        del s, sr  # frees the gradient: back to the pool
    assert ptrs[0] == ptrs[1] and cpu_pool.stats().hits >= 1
