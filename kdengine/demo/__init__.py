"""``kdengine demo``: the main job, end to end on the bundled MNIST, in one command.

Stages (one progress bar each; wall time of each in the report):

1. **teacher** — a float CNN trained with cross-entropy (:class:`kdengine.train.Distiller`).
2. **distill** — its logits are cached once; a binary student (binary weights *and* activations,
   first/last layer full precision) is distilled with the fused :func:`kdengine.kd_loss`
   (``KDTerm``), and, for contrast, the same student with cross-entropy only (full mode); a
   binary-*weight* ReLU student, the SNN's ANN, is distilled the same way.
3. **runtime** — the student is packed (:func:`kdengine.nn.pack_model`), saved
   (safetensors + JSON manifest), loaded with :func:`kdengine.infer.load`; batch-1 latency p50/p99
   of the runtime vs the float architecture and the teacher in torch eager.
4. **snn** — the binary-weight student becomes a binary SNN (:func:`kdengine.snn.convert`, spikes x
   binary weights on the packed AND-popcount kernel) with the latency cuts: scaling search at a
   target T and early exit, both tuned on held-out training images; accuracy, mean time steps,
   batch-1 latency.
5. **crossbar** — the XNOR layers on simulated crossbar tiles (:func:`kdengine.crossbar.simulate`):
   the ideal ADC is checked to equal the packed kernels bit for bit; a 128-row, 4-bit ADC with
   stored-bit flips; accuracy against ADC bits and bit-error rate; tile activations, ADC conversions.
6. **report** — one table (teacher / students / packed runtime / crossbar / SNN: accuracy, batch-1
   latency, size, time steps), ``demo.json``, ``demo.md``, ``demo.png`` under ``--out``.

Modules: :mod:`~kdengine.demo.config` (settings, presets), :mod:`~kdengine.demo.runtime`,
:mod:`~kdengine.demo.spiking`, :mod:`~kdengine.demo.inmemory`, :mod:`~kdengine.demo.report`,
:mod:`~kdengine.demo.progress`, :mod:`~kdengine.demo.pipeline` (wires them, trains through
:func:`kdengine.train.fit`), :mod:`~kdengine.demo.command` (the CLI). The networks are
:mod:`kdengine.models`; the result files go through :mod:`kdengine.repro.results` (atomic writes).
"""
from kdengine.demo.config import DemoConfig, make_config
from kdengine.demo.pipeline import DEFAULT_OUT, STAGES, run

__all__ = ["run", "main", "make_config", "DemoConfig", "STAGES", "DEFAULT_OUT"]


def main(argv=None) -> int:
    """``kdengine demo`` (see :mod:`kdengine.demo.command`)."""
    from kdengine.demo.command import main as _main

    return _main(argv)
