"""Runtime stage: pack the XNOR student, save it (safetensors + JSON manifest), load it with
:mod:`kdengine.infer`, check it against the trained model, and time batch-1 latency side by side.

Latency: every implementation is called on the same single test image, in interleaved blocks
(:func:`kdengine.bench.infer.interleaved_times`: a few untimed calls, then timed calls, in turn,
for several rounds, so a drifting load on a shared machine hits them alike); p50 / p99 are
nearest-rank percentiles of the per-call wall times (:func:`kdengine.infer.runtime.latency_stats`).
The eager models run under ``torch.inference_mode``.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from kdengine.bench.infer import interleaved_times
from kdengine.infer import load
from kdengine.infer.runtime import latency_stats
from kdengine.nn import pack_model, state_nbytes
from kdengine.serialize import read_manifest, save_packed

__all__ = ["pack_and_load", "measure_latency", "eager_fn", "fp32_bytes", "MODEL_FILE"]

MODEL_FILE = "demo_xnor_student.safetensors"


@torch.no_grad()
def pack_and_load(student: nn.Module, x_test: Tensor, y_test: Tensor, out_dir: str) -> tuple[Any, Tensor, dict]:
    """Pack ``student``, write ``out_dir/MODEL_FILE``, load it with :func:`kdengine.infer.load`.

    Returns ``(inference model, its test logits, summary)``; the summary compares the loaded
    model's predictions with the trained (eval-mode) model's.
    """
    student.eval()
    trained = torch.cat([student(x_test[i:i + 1000]) for i in range(0, len(x_test), 1000)])
    path = os.path.join(out_dir, MODEL_FILE)
    save_packed(pack_model(student), path, input_shape=tuple(x_test.shape[1:]))
    manifest = read_manifest(path)
    im = load(path)
    logits = im.predict(x_test)
    pred = logits.argmax(1)
    d = im.describe()
    return im, logits, {
        "file": MODEL_FILE,
        "file_bytes": os.path.getsize(path),
        "state_bytes": d["state_bytes"],
        "weight_bits_bytes": d["weight_bits_bytes"],
        "xnor_layers": d["xnor_layers"],
        "manifest_format": f"{manifest.get('format')} v{manifest.get('format_version')}",
        "test_accuracy": round(float((pred == y_test).double().mean()), 4),
        "prediction_mismatches_vs_trained": int((pred != trained.argmax(1)).sum()),
        "max_abs_logit_diff_vs_trained": float((logits - trained).abs().max()),
    }


def measure_latency(fns: dict[str, Any], rounds: int, per_round: int) -> dict[str, dict]:
    """``{name: {p50_ms, p99_ms, mean_ms, ...}}`` of batch-1 calls (module docstring)."""
    times = interleaved_times(fns, rounds=rounds, per_round=per_round)
    return {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv)
                for kk, vv in latency_stats(v, 1).to_dict().items()} for k, v in times.items()}


def eager_fn(model: nn.Module, x: Tensor):
    """A no-argument callable running ``model(x)`` eagerly under inference mode."""
    model.eval()

    def call():
        with torch.inference_mode():
            return model(x)

    return call


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of a model's state as stored by torch (fp32 weights, BN statistics)."""
    return state_nbytes(model)
