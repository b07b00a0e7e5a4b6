"""Concurrent Python threads: every binary / spiking op and the packed runtime give, from 6 threads
at once, exactly the results of a single-threaded run, with more distinct weights / shapes than any
cache holds (the conv plan LRU keeps 16, the runtime 8 plans per model, the Triton parameter cache
64), so lookups, insertions and evictions race (e.g. ``move_to_end`` / ``popitem`` on a key another
thread has just evicted).

Triton under the CPU interpreter is skipped here: the interpreter patches triton.language globally
while it runs a kernel, so it is not thread-safe itself (on a GPU the Triton backend runs).
"""
from __future__ import annotations

import random
import threading

import pytest
import torch

from kdengine import _dispatch, testing
from kdengine.infer import MAX_PLANS, InferenceModel
from kdengine.ops import binary as bops
from kdengine.ops.binary import binary_conv2d, binary_linear, pack_signs, pack_spikes, spike_matmul, xnor_matmul
from kdengine.ops.if_multistep import if_multistep
from tests.backend_params import backend_params

THREADS = 6


def _threaded(backend):
    if backend == "triton" and _dispatch.triton_interpret():
        pytest.skip("the Triton CPU interpreter is not thread-safe itself")


def _hammer(cases, calls_per_thread, fn, expected):
    """Run ``fn(case)`` from THREADS threads over random cases; every result must equal
    ``expected[i]`` exactly. Returns the number of calls made."""
    errors: list[BaseException] = []
    mismatches: list[int] = []
    barrier = threading.Barrier(THREADS)

    def worker(tid: int) -> None:
        rnd = random.Random(tid * 7919 + 1)
        try:
            barrier.wait()
            for _ in range(calls_per_thread):
                i = rnd.randrange(len(cases))
                out = fn(cases[i])
                if not torch.equal(out, expected[i]):
                    mismatches.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} threads failed, first: {errors[0]!r}"
    assert not mismatches, f"{len(mismatches)} results differ from the single-threaded run"


@pytest.mark.parametrize("backend", backend_params("binary_conv2d"))
def test_binary_conv2d_threads(backend, seed):
    """40 weight/geometry combinations (> the 16 plans cached), 6 threads x 1500 calls."""
    _threaded(backend)
    cases = []
    for i in range(40):  # tiny convs: many calls per second, so the cache churns
        c, o, k = random.choice([1, 3, 33]), random.choice([2, 5]), random.choice([1, 2, 3])
        w = pack_signs(torch.randn(o, c * k * k))
        x = torch.randn(1, c, 4, 3)
        cases.append((x, w, k, torch.rand(o) + 0.5, torch.randn(o), i % 3, 1 + i % 2))
    run = lambda cs: binary_conv2d(cs[0], cs[1], cs[2], cs[3], cs[4], padding=cs[5],  # noqa: E731
                                   stride=cs[6], backend=backend)
    bops._PLANS.clear()
    expected = [run(cs) for cs in cases]
    bops._PLANS.clear()
    _hammer(cases, 1500, run, expected)


@pytest.mark.parametrize("backend", backend_params("binary_linear"))
def test_binary_linear_and_matmuls_threads(backend, seed):
    _threaded(backend)
    cases = []
    for _ in range(24):
        k = random.choice([5, 32, 77, 300])
        m, n = random.choice([1, 3, 17]), random.choice([2, 9, 40])
        cases.append((torch.randn(m, k), pack_signs(torch.randn(m, k)), pack_spikes(torch.rand(m, k) < 0.3),
                      pack_signs(torch.randn(n, k)), torch.rand(n) + 0.5, torch.randn(n)))

    def run(cs):
        x, a, s, w, scale, bias = cs
        return torch.cat([
            binary_linear(x, w, scale, bias, backend=backend).flatten(),
            xnor_matmul(a, w, backend=backend).double().flatten(),
            spike_matmul(s, w, backend=backend).double().flatten(),
        ])

    _hammer(cases, 150, run, [run(cs) for cs in cases])


@pytest.mark.parametrize("backend", backend_params("if_multistep"))
def test_if_multistep_threads(backend, seed):
    """Forward and backward from 6 threads; more parameter sets than the Triton cache (64)."""
    _threaded(backend)
    cases = []
    for i in range(70):
        shape = (random.choice([1, 4, 9]), random.choice([3, 50, 1000]))
        thr = 0.5 + 0.01 * i
        cases.append((torch.randn(*shape) * 0.8 + 0.3, thr, None if i % 2 else -0.1 * (i % 5),
                      torch.randn(*shape)))

    def run(cs):
        x, thr, reset, gs = cs
        xl = x.clone().requires_grad_(True)
        s = if_multistep(xl, thr, reset, backend=backend)
        (g,) = torch.autograd.grad(s, xl, gs)
        return torch.cat([s.detach().flatten(), g.flatten()])

    _hammer(cases, 120, run, [run(cs) for cs in cases])


def test_packed_runtime_several_models_threads(seed):
    """Three packed models shared by 6 threads, 12 batch sizes each (> MAX_PLANS plans per model):
    the runtime's per-model lock and plan LRU, and the binary ops' shared caches underneath."""
    from tests.test_infer import conv_model, mlp_model

    models = [InferenceModel(conv_model("both", 0)), InferenceModel(conv_model("weights", 1)),
              InferenceModel(mlp_model(2, hidden=48))]
    sizes = list(range(1, MAX_PLANS + 5))
    cases = []
    for mi, im in enumerate(models):
        for b in sizes:
            shape = (b, 1, 16, 16) if mi < 2 else (b, 784)
            cases.append((im, torch.randn(*shape)))
    run = lambda cs: cs[0].predict(cs[1])  # noqa: E731
    expected = [run(cs) for cs in cases]
    _hammer(cases, 60, run, expected)


def test_cpu_output_pool_under_threads(seed):
    """The C++ output pool (outputs >= 8 MB of the IF kernels) from 6 threads while another thread
    clears it and changes its limit: every result is right and the statistics stay consistent."""
    avail = _dispatch.op_availability("if_multistep", "cpu", "cpu")
    if not avail.available:
        pytest.skip(avail.reason)
    from kdengine import cpu_pool

    cases = [(torch.randn(8, 2**18 + 1024 * i) * 0.8 + 0.3) for i in range(3)]  # 8+ MB spikes
    run = lambda x: if_multistep(x, 0.9, backend="cpu")  # noqa: E731
    expected = [run(x) for x in cases]
    stop = threading.Event()
    old = cpu_pool.set_limit(64 << 20)

    def churn() -> None:
        rnd = random.Random(5)
        while not stop.is_set():
            if rnd.random() < 0.5:
                cpu_pool.clear()
            else:
                cpu_pool.set_limit(rnd.choice([0, 16 << 20, 64 << 20]))

    t = threading.Thread(target=churn)
    t.start()
    try:
        _hammer(cases, 8, run, expected)
    finally:
        stop.set()
        t.join()
        cpu_pool.set_limit(old)
    st = cpu_pool.stats()
    assert 0 <= st.held_bytes <= st.limit_bytes and st.blocks >= 0


def test_xnor_path_knobs_changed_concurrently(seed):
    """The C++ GEMM's path thresholds (test/bench knobs) flipped by another thread while 6 threads
    multiply: each call reads them once, so it never allocates for one path (uninitialized output)
    and then runs another."""
    avail = _dispatch.op_availability("xnor_matmul", "cpu", "cpu")
    if not avail.available:
        pytest.skip(avail.reason)
    cases = [(pack_signs(torch.randn(m, 200)), pack_signs(torch.randn(n, 200)))
             for m in (16, 24, 40) for n in (8, 200)]
    run = lambda cs: xnor_matmul(cs[0], cs[1], backend="cpu")  # noqa: E731
    expected = [run(cs) for cs in cases]
    stop = threading.Event()
    old_split = testing.set_binary_split_b_rows(16)
    old_lut = testing.set_binary_lut_min(16, 192)

    def flip() -> None:
        i = 0
        while not stop.is_set():
            testing.set_binary_split_b_rows(16 if i % 2 else 10**9)
            testing.set_binary_lut_min(*((16, 192) if i % 3 else (10**9, 10**9)))
            i += 1

    t = threading.Thread(target=flip)
    t.start()
    try:
        _hammer(cases, 400, run, expected)
    finally:
        stop.set()
        t.join()
        testing.set_binary_split_b_rows(old_split)
        testing.set_binary_lut_min(*old_lut)
