"""Quantization: affine integer math and calibration observers.

:mod:`slimkit.quant.affine` holds the pure functions (``QuantSpec``, qparams, quantize,
dequantize, fake-quantize, per-group, int4 packing); :mod:`slimkit.quant.observers` the
calibration range estimators (``minmax``, ``moving_average``, ``percentile``, ``mse``,
``entropy``) behind one ``Observer`` interface and the ``OBSERVERS`` registry.
"""

from slimkit.quant.affine import (
    QuantSpec,
    dequantize,
    dequantize_per_group,
    fake_quantize,
    pack_int4,
    qparams_from_range,
    quantize,
    quantize_per_group,
    tensor_range,
    unpack_int4,
)
from slimkit.quant.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "dequantize",
    "dequantize_per_group",
    "fake_quantize",
    "make_observer",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_per_group",
    "tensor_range",
    "unpack_int4",
]
