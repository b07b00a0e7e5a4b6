"""One definition of every native kernel op's schema, in the ``kdengine`` namespace.

The C++ (``csrc/<op>/*.cpp``) and CUDA (``csrc/<op>/*.cu``) sources only register per-device
kernels for these ops (``TORCH_LIBRARY_IMPL(kdengine, CPU / CUDA, m)``), as torchao does, so the
CPU and CUDA backends of an op cannot disagree on its arguments. Both libraries may be loaded in
one process, so the schemas cannot come from either of them: :func:`define` registers them from
Python, once per process, before :mod:`kdengine._native` loads a library. The strings live next to
their op (``ops/<op>/schema.py``). CPU-only utilities and test knobs (the output pool, the binary
ISA, ``parallel_probe``) keep their own ``kdengine_cpu`` namespace, defined by the C++ library.
"""
from __future__ import annotations

import importlib
import threading

import torch

NAMESPACE = "kdengine"
_MODULES = (
    "kdengine.ops.kd_loss.schema",
    "kdengine.ops.binary.schema",
    "kdengine.ops.if_multistep.schema",
    "kdengine.ops.lif_multistep.schema",
    "kdengine.llm.topk_schema",
)
_LOCK = threading.Lock()
_LIBS: dict[str, torch.library.Library] = {}  # namespace -> the library holding its definitions


def schemas() -> dict[str, str]:
    """op name -> schema string, for every native kernel op."""
    out: dict[str, str] = {}
    for mod in _MODULES:
        for schema in importlib.import_module(mod).SCHEMAS:
            out[schema.split("(", 1)[0]] = schema
    return out


def define(namespace: str = NAMESPACE, names: tuple[str, ...] | None = None) -> None:
    """Define the schemas (all, or ``names``) in ``namespace``, once per process. Another
    namespace serves test builds that must not collide with the real kernels (the CUDA host
    emulation registers ``kdengine_cuda_emul::kd_loss_kernel``)."""
    with _LOCK:
        if namespace in _LIBS:
            return
        lib = torch.library.Library(namespace, "FRAGMENT")
        for name, schema in schemas().items():
            if names is None or name in names:
                lib.define(schema)
        _LIBS[namespace] = lib
