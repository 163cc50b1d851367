"""Export: ONNX (fp32 and QDQ) and packed checkpoints."""

from slimkit.export.packed import (
    PackedReport,
    PackedTensorInfo,
    load_packed,
    load_packed_into,
    save_packed,
)

__all__ = ["PackedReport", "PackedTensorInfo", "load_packed", "load_packed_into", "save_packed"]
