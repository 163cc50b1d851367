"""Static post-training quantization (PTQ): fold BatchNorm, insert fake quantizers, calibrate.

``apply(model)`` works in place: it folds every conv -> BatchNorm pair
(:func:`~slimkit.quant.fold.fold_batchnorm_`), traces the model with ``torch.fx`` and inserts one
:class:`~slimkit.quant.fake.ActivationQuantizer` per tensor that ONNX Runtime needs quantized to
run integer kernels, stored in ``model.activation_quantizers`` (keyed by the ``torch.fx`` node
name of the tensor). The traced graph becomes ``model.forward``; ``strip_quantization`` undoes it.

Quantized tensors, in the QDQ layout ONNX Runtime fuses (``QLinearConv``, ``QLinearAdd``,
``QGemm``, ``QLinearGlobalAveragePool``):

* the input of every selected Conv/Linear and both inputs of every residual ``+``/``torch.add``,
  and the input of average pools;
* the output of each of those ops, taken after a directly following ReLU/ReLU6 (and
  ``nn.Identity``/``nn.Dropout``) so that the activation fuses into the integer kernel. Model
  outputs are quantized only with ``post_quant`` (default True);
* reshaping ops (flatten, view, max-pool, ...) of a quantized tensor reuse its quantizer, so
  ONNX Runtime can run them on int8 data.

Selected Conv/Linear layers get a per-channel int8 symmetric
:class:`~slimkit.quant.fake.WeightQuantizer` and an int32 :class:`~slimkit.quant.fake.BiasQuantizer`
as parametrizations. Activations are uint8 asymmetric. ``reduce_range`` uses 7-bit activations
(codes 0..127) for x86 CPUs without VNNI, where u8 x s8 products summed in pairs can saturate
int16; leave it False on VNNI/AVX512-VNNI, ARM and GPUs.

``mode="hooks"`` is for models ``torch.fx`` cannot trace (Hugging Face transformers, Python
control flow): no graph is traced; a forward pre-hook quantizes the input of every selected
Conv/Linear (:mod:`slimkit.quant.input_quant`) and outputs, adds and pools stay float. Exported
with :func:`slimkit.export.qdq.export_qdq`, each Linear becomes ``Q -> DQ -> MatMul`` with a
``DQ`` int8 weight and no ``Q`` on the output, which ONNX Runtime runs as
``MatMulIntegerToFloat`` (``QGemm`` with float output for 2-D inputs); that is where a
transformer's time goes. Convs in this mode are emulated, but ONNX Runtime has no integer
kernel for a Conv without a quantized output, so they run in float there.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import operator
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import fx, nn

from slimkit.core.config import Config
from slimkit.core.scope import (
    WEIGHT_LAYER_NAMES,
    Scope,
    Selection,
    closest_names,
    is_weight_layer,
    module_type_name,
    rule_matches,
    validate_rule,
)
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.distributed import all_reduce_, check_unsharded
from slimkit.errors import ConfigError, ScopeError, StateError, UnsupportedModuleError, first_line
from slimkit.quant.fake import (
    ActivationQuantizer,
    activation_spec,
    add_weight_quantizers,
    quantizer_of,
    remove_weight_quantizers,
    weight_spec,
)
from slimkit.quant.fold import fold_batchnorm_
from slimkit.quant.input_quant import (
    add_input_quantizer,
    input_quantizer_of,
    remove_input_quantizers,
)
from slimkit.quant.observers import make_observer

__all__ = [
    "QUANTIZER_DICT",
    "StaticQuantization",
    "StaticQuantizationConfig",
    "quantize_static",
    "strip_quantization",
]

QUANTIZER_DICT = "activation_quantizers"
ObserverName = Literal["minmax", "moving_average", "percentile", "mse", "entropy"]
Mode = Literal["graph", "hooks"]

# Roles of graph nodes. pool/add/weighted ops get quantized inputs and outputs; an "act" right
# after one fuses into it; "identity" is skipped over; "pass" ops reuse their input's quantizer.
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_MODULE_KINDS = (
    ("pool", (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)),
    ("act", (nn.ReLU, nn.ReLU6)),
    ("identity", (nn.Identity, nn.Dropout)),
    ("pass", (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d)),
)
_FUNCTION_KINDS = (
    ("act", (F.relu, torch.relu, F.relu6)),
    ("pool", (F.adaptive_avg_pool2d, F.avg_pool2d)),
    ("pass", (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)),
)
_METHOD_KINDS = (
    ("act", ("relu",)),
    ("pass", ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")),
)


class StaticQuantizationConfig(Config):
    """Static int8 PTQ of the scoped Conv/Linear layers, their activations and residual adds.

    ``fp32_layers`` keeps modules in float: rules in the :class:`Scope` grammar, a rule naming a
    container keeps every layer inside it; a rule that matches no module is a ``ScopeError``.
    ``bits`` 2..8 are emulated; ONNX export needs 8. ``observer_options`` go to the observer
    (e.g. ``{"percentile": 99.9}``). ``per_channel`` gives each output channel its own weight
    scale. ``post_quant`` also quantizes model outputs (False keeps float logits; ``QGemm``
    still runs in int8). On x86 CPUs with AVX2 but without VNNI (``slimkit.quant.saturation.
    needs_reduce_range()``), ONNX Runtime's u8s8 kernels add pairs of products in saturating
    int16: ``reduce_weight_range`` (recommended there) re-quantizes the weights of every
    non-depthwise layer onto 7-bit codes after calibration, which cannot saturate and keeps the
    graph and its speed; ``reduce_range`` (7-bit activations) also avoids it, at the cost of a
    Clip per quantizer and more error. Both default to False: full 8 bits, right on VNNI,
    AMX, ARM and GPUs (see benchmarks/README.md, quant_digits).
    ``mode``: ``"graph"`` traces the model with ``torch.fx`` and quantizes the dataflow (inputs,
    outputs, residual adds, pools); ``"hooks"`` quantizes only the inputs of the selected layers
    through forward pre-hooks, for models ``torch.fx`` cannot trace (``post_quant`` applies to
    graph mode only: hooks leave every output float). ``embeddings`` also stores the weights of
    the ``nn.Embedding`` modules in scope as int8, weight-only (symmetric, one scale per
    embedding dimension with ``per_channel``): ONNX Runtime gathers int8 rows and dequantizes
    only those (a transformer's word-embedding table is often most of its size).
    """

    kind: Literal["static_quant"] = "static_quant"
    scope: Scope = Scope()
    observer: ObserverName = "minmax"
    observer_options: dict[str, float | int] = Field(default_factory=dict)
    bits: Annotated[int, Field(ge=2, le=8)] = 8
    per_channel: bool = True
    fp32_layers: tuple[str, ...] = ()
    post_quant: bool = True
    reduce_range: bool = False
    reduce_weight_range: bool = False
    mode: Mode = "graph"
    embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> StaticQuantizationConfig:
        for rule in self.fp32_layers:
            validate_rule(rule)
        if self.reduce_range and self.bits < 3:
            raise ValueError(f"reduce_range needs bits >= 3, got bits={self.bits}")
        make_observer(self.observer, activation_spec(self.bits), **self.observer_options)
        return self


def _kind(node: fx.Node, modules: dict[str, nn.Module], weighted: set[str]) -> str | None:
    """Role of ``node``: weighted, add, pool, act, identity, pass, or None (anything else)."""
    if node.op == "call_module":
        if str(node.target) in weighted:
            return "weighted"
        module = modules.get(str(node.target))
        return next((k for k, types in _MODULE_KINDS if isinstance(module, types)), None)
    two_tensors = len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)
    if node.op == "call_function":
        if node.target in _ADD_FUNCTIONS:
            return "add" if two_tensors else None
        return next((k for k, fns in _FUNCTION_KINDS if node.target in fns), None)
    if node.op == "call_method":
        if node.target == "add":
            return "add" if two_tensors else None
        return next((k for k, names in _METHOD_KINDS if node.target in names), None)
    return None


def _output_point(node: fx.Node, kind_of) -> fx.Node:
    """Last node of ``node`` -> [identity]* -> [one ReLU/ReLU6] -> [identity]* (single users)."""
    current, activated = node, False
    while len(current.users) == 1:
        user = next(iter(current.users))
        if not user.args or user.args[0] is not current:
            break
        kind = kind_of(user)
        if kind == "identity" or (kind == "act" and not activated):
            activated = activated or kind == "act"
            current = user
            continue
        break
    return current


def _insert_quantizers(
    model: nn.Module, graph: fx.Graph, weighted: set[str], config: StaticQuantizationConfig
) -> dict[str, str]:
    """Insert activation quantizers into ``graph``; return {weighted module: input quantizer}."""
    modules = dict(model.named_modules())

    def kind_of(n: fx.Node) -> str | None:
        return _kind(n, modules, weighted)

    demanded: list[fx.Node] = []

    def demand(n: Any) -> None:
        if isinstance(n, fx.Node) and n not in demanded:
            demanded.append(n)

    calls: dict[str, int] = {}
    for node in graph.nodes:
        kind = kind_of(node)
        if kind not in ("weighted", "add", "pool"):
            continue
        if kind == "weighted":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        inputs = node.args[:2] if kind == "add" else node.args[:1]
        if not inputs:
            raise UnsupportedModuleError(f"static_quant: {node.name!r} is called without inputs")
        for arg in inputs:
            demand(arg)
        out = _output_point(node, kind_of)
        if config.post_quant or any(u.op != "output" for u in out.users):
            demand(out)
    shared_twice = sorted(name for name, count in calls.items() if count > 1)
    if shared_twice:
        raise UnsupportedModuleError(
            f"static_quant: module(s) {', '.join(shared_twice)} are called more than once; one "
            "bias grid per call is needed, so exclude them or give each call its own module"
        )

    spec = activation_spec(config.bits, reduce_range=config.reduce_range)
    store = nn.ModuleDict()
    keys: dict[fx.Node, str] = {}
    for node in graph.nodes:  # topological order: a reshape's source is keyed before it
        if node not in demanded:
            continue
        source = node.args[0] if node.args else None
        shared = kind_of(node) in ("pass", "identity") and source in keys
        keys[node] = keys[source] if shared else node.name
        if not shared:
            store[node.name] = ActivationQuantizer(
                spec, config.observer, **dict(config.observer_options)
            )
        with graph.inserting_after(node):
            kwargs = {"observe": False} if shared else {}
            q = graph.call_module(f"{QUANTIZER_DICT}.{keys[node]}", (node,), kwargs)
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        keys[q] = keys[node]  # later reshapes of this tensor see q as their source
    model.add_module(QUANTIZER_DICT, store)
    inputs_of = {}
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in weighted:
            inputs_of[str(node.target)] = str(node.args[0].target).split(".", 1)[1]
    return inputs_of


def _run_batch(model: nn.Module, batch: Any, device: torch.device) -> None:
    """Feed a tensor, the first item of an ``(inputs, targets)`` pair, or a dict of kwargs."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, dict):
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    elif isinstance(batch, torch.Tensor):
        model(batch.to(device))
    else:
        raise ConfigError(
            "calibration batches must be a tensor, an (inputs, targets) pair or a dict of model "
            f"inputs, got {type(batch).__name__}"
        )


@register_technique
class StaticQuantization(Technique):
    """See :class:`StaticQuantizationConfig` and the module docstring.

    Life cycle: ``apply(model)`` -> ``calibrate(model, loader)`` -> ``finalize(model)`` returns
    the calibrated fake-quant model, ready for :func:`slimkit.export.qdq.export_qdq`.
    """

    kind = "static_quant"
    config_class = StaticQuantizationConfig
    config: StaticQuantizationConfig

    def __init__(self, config: StaticQuantizationConfig | None = None) -> None:
        super().__init__(StaticQuantizationConfig() if config is None else config)
        self._inputs_of: dict[str, str] = {}
        self.calibrated = False

    def plan(self, model: nn.Module) -> Selection:
        embeddings = self.config.embeddings
        selection = self.config.scope.select(
            model,
            lambda m: is_weight_layer(m) or (embeddings and isinstance(m, nn.Embedding)),
            technique=self.kind,
            describe_supported=WEIGHT_LAYER_NAMES + (", Embedding" if embeddings else ""),
        )
        named = list(model.named_modules())
        for rule in self.config.fp32_layers:
            if not any(rule_matches(rule, n, m) for n, m in named if n):
                near = closest_names(rule, [n for n, _ in named if n])
                hint = f"; closest names: {', '.join(near)}" if near else ""
                raise ScopeError(f"{self.kind}: fp32_layers rule {rule!r} matches no module{hint}")
        kept = [(n, m) for n, m in selection.selected if self._fp32_rule(n, model) is None]
        for name, _ in selection.selected:
            if (rule := self._fp32_rule(name, model)) is not None:
                selection.skipped.append((name, f"kept in float by fp32_layers rule {rule!r}"))
        selection.selected = kept
        return selection

    def _fp32_rule(self, name: str, model: nn.Module) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the module itself or any container above it
            prefix = ".".join(parts[:i])
            module = model.get_submodule(prefix)
            for rule in self.config.fp32_layers:
                if rule_matches(rule, prefix, module):
                    return rule
        return None

    def apply(self, model: nn.Module) -> None:
        if self._already_applied(model):
            return
        check_unsharded(model, self.kind)
        if hasattr(model, QUANTIZER_DICT):
            raise StateError(f"{self.kind}: the model already has {QUANTIZER_DICT}")
        if quantized := [n for n, m in model.named_modules() if input_quantizer_of(m) is not None]:
            raise StateError(f"{self.kind}: {quantized[0]!r} already has an input quantizer")
        selection = self.plan(model)
        fold_batchnorm_(model)
        layers = [(n, m) for n, m in selection.selected if not isinstance(m, nn.Embedding)]
        if self.config.mode == "hooks":
            self._inputs_of = self._insert_input_hooks(model, layers)
        else:
            try:
                graph = fx.Tracer().trace(model)
            except Exception as exc:
                raise UnsupportedModuleError(
                    f"{self.kind}: {type(model).__name__} cannot be traced by torch.fx "
                    f"({first_line(exc)}); "
                    "static quantization needs the model's dataflow, or mode='hooks' to "
                    "quantize only the inputs of Conv/Linear layers"
                ) from exc
            names = {name for name, _ in layers}
            self._inputs_of = _insert_quantizers(model, graph, names, self.config)
        wspec = weight_spec(self.config.bits, per_channel=self.config.per_channel)
        columns = dataclasses.replace(wspec, axis=1)  # an Embedding's channels: its columns
        for _, module in selection.selected:
            add_weight_quantizers(module, columns if isinstance(module, nn.Embedding) else wspec)
        if self.config.mode == "graph":
            graph_module = fx.GraphModule(model, graph, class_name=type(model).__name__)
            object.__setattr__(model, "forward", graph_module.forward)
        self.selection, self._model = selection, model

    def _insert_input_hooks(
        self, model: nn.Module, layers: list[tuple[str, nn.Module]]
    ) -> dict[str, str]:
        """An ``input_quantizer`` and its pre-hook on each of ``layers``; {layer: layer}."""
        config = self.config
        spec = activation_spec(config.bits, reduce_range=config.reduce_range)
        for _, module in layers:
            quantizer = ActivationQuantizer(spec, config.observer, **dict(config.observer_options))
            add_input_quantizer(module, quantizer)
        return {name: name for name, _ in layers}

    def _activation_quantizers(self) -> dict[str, ActivationQuantizer]:
        selection = self._require_applied()
        if self.config.mode == "hooks":  # keyed by layer name
            found = ((name, input_quantizer_of(module)) for name, module in selection.selected)
            return {name: quantizer for name, quantizer in found if quantizer is not None}
        return dict(getattr(self._model, QUANTIZER_DICT).items())

    @torch.no_grad()
    def calibrate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        num_batches: int | None = None,
        progress: bool = False,
    ) -> nn.Module:
        """Stream batches through ``model`` (eval mode, no grad), then freeze every quantizer.

        Batches are tensors, ``(inputs, ...)`` tuples (the first item is the input) or dicts of
        keyword inputs; nothing is stored beyond the observers' fixed-size statistics. Under
        ``torch.distributed`` every rank calibrates on its own batches (call it on every rank);
        the observers' statistics are then merged (:meth:`Observer.synchronize`), so every rank
        freezes the same qparams.
        """
        if model is not self._model:
            raise StateError(f"{self.kind}: calibrate the model this technique was applied to")
        if self.calibrated:
            raise StateError(f"{self.kind}: the model is already calibrated")
        if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
            raise ConfigError(f"num_batches must be a positive int or None, got {num_batches!r}")
        check_unsharded(model, self.kind)
        from rich.progress import track

        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        seen = 0
        model.eval()
        batches = itertools.islice(loader, num_batches)
        for batch in track(batches, "calibrating", total=num_batches, disable=not progress):
            _run_batch(model, batch, device)
            seen += 1
        if int(all_reduce_(torch.tensor(seen), "sum")) == 0:  # over every rank
            raise ConfigError("calibration loader yielded no batches")
        self._freeze()
        return model

    def rebuild(self, model: nn.Module) -> nn.Module:
        """Fold, trace and insert quantizers again; calibrated qparams load with the weights."""
        calibrated = self.calibrated
        self.apply(model)
        self.calibrated = calibrated
        return model

    def after_training(
        self, model: nn.Module, batches: Iterable[Any], *, progress: bool = False
    ) -> bool:
        """Calibrate on ``batches`` once the stage has trained (post-training quantization)."""
        self.calibrate(model, batches, progress=progress)
        return True

    def export_onnx(self, model: nn.Module, example_inputs: tuple[Any, ...], path: Path) -> Path:
        """The calibrated model as an ONNX QDQ file that ONNX Runtime runs with int8 kernels."""
        from slimkit.export.qdq import export_qdq  # here: keeps onnx out of `import slimkit`

        return export_qdq(model, example_inputs, path)

    def _freeze(self) -> None:
        quantizers = self._activation_quantizers()
        for quantizer in quantizers.values():  # several processes: merge their statistics
            quantizer.observer.synchronize()
        for key, quantizer in quantizers.items():
            if not quantizer.observer.observed:
                raise StateError(
                    f"{self.kind}: activation quantizer {key!r} saw no data during calibration "
                    "(a branch the calibration batches never took)"
                )
            quantizer.freeze()
        for name, module in self._require_applied().selected:
            wq = quantizer_of(module, "weight")
            wq.freeze(module.parametrizations.weight.original)
            bq = quantizer_of(module, "bias")
            if bq is not None:
                bq.freeze(quantizers[self._inputs_of[name]].scale, wq.scale)
        self.calibrated = True
        if self.config.reduce_weight_range:
            from slimkit.quant.saturation import reduce_weight_range_

            reduce_weight_range_(self)

    def summary(self) -> TechniqueSummary:
        selection = self._require_applied()
        quantizers = self._activation_quantizers()
        rows = []
        for name, module in selection.selected:
            q = quantizers.get(self._inputs_of.get(name, ""))  # None: an Embedding (weight only)
            calibrated = q is not None and q.is_calibrated
            qparams = [float(q.scale), int(q.zero_point)] if calibrated else [None, None]
            rows.append([name, module_type_name(module), self.config.bits, *qparams])
        totals = {"layers": len(rows), "activation_quantizers": len(quantizers)}
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "type", "bits", "input_scale", "input_zero_point"],
            rows=rows,
            totals={**totals, "calibrated": self.calibrated},
            skipped=list(selection.skipped),
        )

    def finalize(self, model: nn.Module) -> nn.Module:
        """The calibrated fake-quant model itself (export it with ``export_qdq``)."""
        self._require_applied()
        if not self.calibrated:
            raise StateError(f"{self.kind}: call calibrate(model, loader) before finalize")
        return model

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["calibrated"] = self.calibrated
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.calibrated = bool(state["calibrated"])


def quantize_static(
    model: nn.Module,
    loader: Iterable[Any],
    config: StaticQuantizationConfig | None = None,
    *,
    num_batches: int | None = None,
) -> nn.Module:
    """A calibrated fake-quant copy of ``model`` (the input is left untouched).

    >>> from slimkit.models.cnn import DigitsResNet
    >>> q = quantize_static(DigitsResNet(width=4), [torch.rand(8, 1, 8, 8)])
    >>> q(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    copied = copy.deepcopy(model)
    technique = StaticQuantization(config)
    technique.apply(copied)
    technique.calibrate(copied, loader, num_batches=num_batches)
    return technique.finalize(copied)


def strip_quantization(model: nn.Module) -> nn.Module:
    """Undo ``apply`` in place: drop quantizers, input hooks and the traced forward (BatchNorm
    stays folded)."""
    model.__dict__.pop("forward", None)
    remove_input_quantizers(model)
    if QUANTIZER_DICT in model._modules:
        del model._modules[QUANTIZER_DICT]
    for module in model.modules():
        remove_weight_quantizers(module)
    return model
