"""Quantization: affine integer math and calibration observers.

:mod:`slimkit.quant.affine` holds the pure functions (``QuantSpec``, qparams, quantize,
dequantize, fake-quantize, per-group, int4 packing); :mod:`slimkit.quant.observers` the
calibration range estimators (``minmax``, ``moving_average``, ``percentile``, ``mse``,
``entropy``) behind one ``Observer`` interface and the ``OBSERVERS`` registry.
:mod:`slimkit.quant.fold` folds BatchNorm into convs; :mod:`slimkit.quant.fake` holds the
fake-quant modules and :mod:`slimkit.quant.ptq` static post-training quantization;
:mod:`slimkit.quant.weight_only` weight-only int8/int4, :mod:`slimkit.quant.dynamic` dynamic int8;
:mod:`slimkit.quant.lsq` learned step sizes, :mod:`slimkit.quant.qat` quantization-aware training.
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
from slimkit.quant.dynamic import (
    DynamicQuantConfig,
    DynamicQuantization,
    DynamicQuantLinear,
    export_dynamic_onnx,
)
from slimkit.quant.fake import ActivationQuantizer, BiasQuantizer, WeightQuantizer
from slimkit.quant.fold import find_conv_bn_pairs, fold_batchnorm, fold_bn_into_conv
from slimkit.quant.lsq import LSQQuantizer, lsq_fake_quantize
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
from slimkit.quant.ptq import (
    StaticQuantization,
    StaticQuantizationConfig,
    quantize_static,
    strip_quantization,
)
from slimkit.quant.qat import QATConfig, QuantizationAwareTraining
from slimkit.quant.weight_only import (
    WeightOnlyConfig,
    WeightOnlyLinear,
    WeightOnlyQuantization,
    load_weight_only,
    save_weight_only,
    strip_weight_only,
)

__all__ = [
    "OBSERVERS",
    "ActivationQuantizer",
    "BiasQuantizer",
    "DynamicQuantConfig",
    "DynamicQuantLinear",
    "DynamicQuantization",
    "EntropyObserver",
    "LSQQuantizer",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "PercentileObserver",
    "QATConfig",
    "QuantSpec",
    "QuantizationAwareTraining",
    "StaticQuantization",
    "StaticQuantizationConfig",
    "WeightOnlyConfig",
    "WeightOnlyLinear",
    "WeightOnlyQuantization",
    "WeightQuantizer",
    "dequantize",
    "dequantize_per_group",
    "export_dynamic_onnx",
    "fake_quantize",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "fold_bn_into_conv",
    "load_weight_only",
    "lsq_fake_quantize",
    "make_observer",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_per_group",
    "quantize_static",
    "save_weight_only",
    "strip_quantization",
    "strip_weight_only",
    "tensor_range",
    "unpack_int4",
]
