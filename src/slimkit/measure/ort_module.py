"""An ONNX model run by ONNX Runtime behind the ``nn.Module`` call interface.

:class:`OrtModule` lets the code that evaluates a PyTorch model (a task's metric, fidelity
checks) evaluate the exported file instead, so a run reports the accuracy of what is deployed,
integer kernels included, not of its PyTorch emulation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.onnx import PathLike
from slimkit.measure.latency import ort_session

__all__ = ["OrtModule"]


class OrtModule(nn.Module):
    """``OrtModule(path)(x)`` runs the ONNX model at ``path`` on CPU and returns torch tensors.

    Positional tensor inputs map to the graph inputs in order; one output is returned as a
    tensor, several as a tuple. ``train()``/``eval()`` are accepted and change nothing.
    """

    def __init__(self, path: PathLike, *, threads: int = 1, optimization: str = "all") -> None:
        super().__init__()
        self.path = str(path)
        self.session = ort_session(path, threads=threads, optimization=optimization)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ConfigError(
                f"{self.path} takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        feed = {
            name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for name, x in zip(self.input_names, inputs, strict=True)
        }
        outputs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def extra_repr(self) -> str:
        return f"path={self.path!r}"
