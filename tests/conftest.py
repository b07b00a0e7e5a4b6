"""Test setup: Triton kernels run through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Blocks smaller than the test vocabularies (V up to 301), so the Triton kernels' multi-block
# loops run in the tests and not only their single-block path.
os.environ.setdefault("KDENGINE_TRITON_KD_BLOCK", "128")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test run (printed on failure), so inputs differ from run to run."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s


@pytest.fixture(params=[0, 2, 3], ids=["portable", "avx2", "avx512"])
def cpu_float_path(request) -> int:
    """Forces each instruction-set path of the C++ float kernels (kd_loss, topk_kd, if_multistep)
    for the test, skipping the ones this CPU lacks (kdengine.testing.float_isa)."""
    from kdengine import testing

    try:
        old = testing.set_float_isa(request.param)
    except ValueError as exc:
        pytest.skip(f"this CPU lacks the path: {exc}")
    yield request.param
    testing.set_float_isa(old)
