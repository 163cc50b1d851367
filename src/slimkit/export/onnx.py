"""Export a PyTorch model to ONNX and inspect the graph ONNX Runtime will run.

``export_onnx`` uses the TorchScript exporter (``dynamo=False``), marks the batch axis dynamic on
every input and output, checks the result with ``onnx.checker`` and writes it atomically: a failed
export leaves any existing file untouched. ``onnx_op_counts`` counts node types in a graph and
``optimized_op_counts`` counts them after ONNX Runtime's graph optimisations, which is where fused
kernels such as ``FusedConv``, ``QLinearConv`` or ``MatMulInteger`` show up.
"""

from __future__ import annotations

import collections
import inspect
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from slimkit.errors import ConfigError, SlimkitError, UnsupportedModuleError
from slimkit.io import atomic_path

PathLike = str | os.PathLike[str]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def ort_optimization_level(level: str) -> ort.GraphOptimizationLevel:
    """Map ``"disable" | "basic" | "extended" | "all"`` to ONNX Runtime's enum."""
    try:
        return _LEVELS[level]
    except KeyError:
        raise ConfigError(
            f"optimization level must be one of {sorted(_LEVELS)}, got {level!r}"
        ) from None


def _tensor_leaves(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in a nested structure of tuples, lists and dicts, in the exporter's order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensor_leaves(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensor_leaves(item)


def _names(given: Sequence[str] | None, count: int, stem: str, what: str) -> list[str]:
    if given is not None:
        names = list(given)
        if len(names) != count:
            raise ConfigError(f"{what} must name {count} tensors, got {len(names)}: {names}")
        return names
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _one_line(model: nn.Module, exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    detail = lines[0].strip() if lines else type(exc).__name__
    return f"ONNX export of {type(model).__name__} failed: {detail}"


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    path: PathLike,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export ``model`` to ONNX at ``path`` and return the path.

    The model is exported in eval mode and each module's training flag is restored afterwards.
    Inputs default to ``input`` / ``input_0..`` and outputs to ``output`` / ``output_0..``; with
    ``dynamic_batch`` axis 0 of every input and output is named ``batch``. ``dynamic_axes``
    names more dynamic axes per input/output name, e.g. ``{"input_ids": {1: "sequence"}}``
    for a variable sequence length (an unknown name is a :class:`ConfigError`). Exporter
    failures are raised as :class:`UnsupportedModuleError` (an operator ONNX cannot express) or
    :class:`SlimkitError` (anything else), with a one-line message naming the model class.
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        try:
            # As in torch.onnx.export, a trailing dict holds keyword arguments.
            has_kw = bool(args) and isinstance(args[-1], dict)
            positional, kw = (args[:-1], args[-1]) if has_kw else (args, {})
            with torch.no_grad():
                outputs = model(*positional, **kw)
        except Exception as exc:
            raise SlimkitError(_one_line(model, exc)) from exc
        in_tensors = list(_tensor_leaves(args))
        out_tensors = list(_tensor_leaves(outputs))
        in_names = _names(input_names, len(in_tensors), "input", "input_names")
        out_names = _names(output_names, len(out_tensors), "output", "output_names")
        axes: dict[str, dict[int, str]] = {}
        if dynamic_batch:
            named = zip(in_names + out_names, in_tensors + out_tensors, strict=True)
            axes = {name: {0: "batch"} for name, t in named if t.dim() > 0}
        for name, extra in (dynamic_axes or {}).items():
            if name not in in_names + out_names:
                raise ConfigError(
                    f"dynamic_axes names {name!r}, not an input or output "
                    f"({', '.join(in_names + out_names)})"
                )
            axes[name] = {**axes.get(name, {}), **{int(k): str(v) for k, v in extra.items()}}
        kwargs: dict[str, Any] = {}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False
        with atomic_path(path) as tmp:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.onnx.export(
                        model,
                        args,
                        str(tmp),
                        opset_version=opset,
                        input_names=in_names,
                        output_names=out_names,
                        dynamic_axes=axes or None,
                        do_constant_folding=True,
                        **kwargs,
                    )
                onnx.checker.check_model(str(tmp))
            except torch.onnx.errors.UnsupportedOperatorError as exc:
                raise UnsupportedModuleError(_one_line(model, exc)) from exc
            except Exception as exc:
                raise SlimkitError(_one_line(model, exc)) from exc
    finally:
        for module, training in modes.items():
            module.training = training
    return Path(path)


def _count_graph(graph: onnx.GraphProto, counts: collections.Counter[str]) -> None:
    for node in graph.node:
        counts[node.op_type] += 1
        for attr in node.attribute:  # subgraphs of If / Loop / Scan
            if attr.type == onnx.AttributeProto.GRAPH:
                _count_graph(attr.g, counts)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _count_graph(sub, counts)


def onnx_op_counts(path_or_model: PathLike | onnx.ModelProto) -> dict[str, int]:
    """Count node ``op_type``s in an ONNX model (a path or a loaded ``ModelProto``)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        model = onnx.load(str(path_or_model), load_external_data=False)
    counts: collections.Counter[str] = collections.Counter()
    _count_graph(model.graph, counts)
    return dict(sorted(counts.items()))


def optimized_op_counts(path: PathLike, level: str = "all") -> dict[str, int]:
    """Count node types after ONNX Runtime (CPU) optimises the graph at ``level``.

    ``"all"`` includes layout and kernel fusions (``FusedConv``, ``QLinearConv``, ...) that are
    specific to the CPU provider, so counts can differ between machines.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort_optimization_level(level)
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="slimkit-ort-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx_op_counts(optimized)


__all__ = ["export_onnx", "onnx_op_counts", "optimized_op_counts", "ort_optimization_level"]
