"""Inference runtime for packed binary models: :func:`load` -> :class:`InferenceModel`.

* :func:`load` — a file from :func:`kdengine.serialize.save_packed` (safetensors + JSON manifest,
  no pickle) -> :class:`InferenceModel` (``predict``, ``predict_batches``, ``latency``,
  ``plan_summary``).
* :func:`infer_main` — the ``kdengine infer MODEL INPUT [--batch N] [--json]`` command
  (also ``python -m kdengine.infer``; its arguments: :func:`infer_parser`).
* :func:`load_input` — the command's INPUT: ``.npy`` / ``.npz`` / ``.safetensors`` or
  ``mnist:SPLIT[:N]``.
"""
from kdengine.infer.runtime import (
    MAX_PLANS,
    InferenceModel,
    LatencyStats,
    infer_main,
    infer_parser,
    load,
    load_input,
)

__all__ = ["load", "InferenceModel", "LatencyStats", "MAX_PLANS", "infer_main", "infer_parser", "load_input"]
