"""One place that turns the backend registry into pytest parameters (skipped with the reason)."""
from __future__ import annotations

import pytest
import torch

from kdengine import _dispatch


def backend_params(op: str, device: str = "cpu", slow_interpreted: bool = False) -> list:
    """Every backend of ``op`` as a pytest param; those that cannot run on ``device`` are skipped
    with the reason the registry gives (no GPU, build error, triton without interpreter...).
    ``slow_interpreted``: the triton param of a test too large for the CPU interpreter in the
    default run is marked slow (``python -m pytest -m slow`` runs it)."""
    _dispatch._load_ops()
    out = []
    for name in _dispatch.BACKENDS:
        if name not in _dispatch._REGISTRY.get(op, {}):
            continue
        avail = _dispatch.op_availability(op, name, device)
        marks = [] if avail.available else [pytest.mark.skip(reason=f"{name}: {avail.reason}")]
        if slow_interpreted and name == "triton" and device == "cpu":
            marks.append(pytest.mark.slow)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def cuda_or_skip():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
