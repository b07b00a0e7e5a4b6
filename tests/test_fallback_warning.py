"""backend="auto" passing over the fastest backend for the device warns once, naming why.

The real case: no C++ compiler, so the CPU kernels cannot be built and every op runs the pure-torch
reference (tens of times slower). Run in a subprocess with ``CXX`` pointing nowhere and a fresh
cache, so nothing of this process's loaded library is reused.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import kdengine
from kdengine import _dispatch
from kdengine._dispatch import Availability, BackendFallbackWarning

SCRIPT = textwrap.dedent("""
    import warnings, torch, kdengine
    from kdengine import ops
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as seen:
        for _ in range(3):
            kdengine.kd_loss(torch.randn(2, 5), torch.randn(2, 5))
        ops.if_multistep(torch.randn(3, 7))
    for w in seen:
        print("WARN", w.category.__name__, w.filename.rsplit("/", 1)[-1], str(w.message))
""")


def test_missing_compiler_warns_once_per_op_at_call_time(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), KDENGINE_CACHE=str(tmp_path / "c"))
    env.pop("KDENGINE_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("WARN")]
    kd = [l for l in lines if "kd_loss on cpu" in l]
    spk = [l for l in lines if "if_multistep on cpu" in l]
    assert len(kd) == 1 and len(spk) == 1, lines  # once per op, not per call
    for line in kd + spk:
        assert "BackendFallbackWarning" in line
        assert "'reference'" in line and "'cpu'" in line
        assert "no C++ compiler" in line and "kdengine doctor" in line
        assert "<string>" in line  # points at the caller's line, not at kdengine's internals


def test_no_warning_when_the_fastest_backend_runs_or_is_chosen(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        kdengine.kd_loss(torch.randn(2, 5), torch.randn(2, 5))  # cpu backend builds here
        kdengine.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="reference")


def test_fallback_warning_names_the_reason(monkeypatch):
    real = _dispatch.op_availability

    def fake(op, backend, device_type=None):
        if backend == "cpu":
            return Availability(False, "the test says the C++ library failed to build")
        return real(op, backend, device_type)

    monkeypatch.setattr(_dispatch, "op_availability", fake)
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    monkeypatch.delenv("KDENGINE_BACKEND", raising=False)
    with pytest.warns(BackendFallbackWarning, match="the test says the C\\+\\+ library failed"):
        kdengine.kd_loss(torch.randn(2, 5), torch.randn(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        kdengine.kd_loss(torch.randn(3, 5), torch.randn(3, 5))
    # an explicit choice of the failing backend is still an error that says why
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    with pytest.raises(RuntimeError, match="failed to build"):
        kdengine.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="cpu")
