"""In-memory (crossbar) computing simulation of packed binary networks.

* :func:`simulate` — run a packed model with its XNOR layers on crossbar tiles of ``rows`` rows,
  a ``b``-bit ADC per tile partial sum, digital accumulation and seeded stored-bit flips; returns
  the outputs and :class:`CrossbarStats` (tile activations, ADC conversions, saturations, flips).
* :func:`adc_quantize` — the ADC model alone; :func:`calibrate_adc_clip` — per-layer ADC windows
  from the partial sums' spread on calibration data.

The exact models are documented in :mod:`kdengine.crossbar.sim`.
"""
from kdengine.crossbar.sim import CrossbarStats, LayerStats, adc_quantize, calibrate_adc_clip, simulate

__all__ = ["simulate", "adc_quantize", "calibrate_adc_clip", "CrossbarStats", "LayerStats"]
