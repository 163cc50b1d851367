"""Quantization-aware training (QAT) with learned step sizes (LSQ / LSQ+) or plain STE.

``apply(model)`` gives every scoped Conv/Linear

* a weight quantizer: an :class:`~slimkit.quant.lsq.LSQQuantizer` parametrization of ``weight``
  (per output channel, signed symmetric narrow range, zero point 0). When the weight already
  carries a pruning :class:`~slimkit.prune.magnitude.WeightMask`, the quantizer is appended
  after it (``w -> w * mask -> quantize``), so a pruned weight stays exactly 0: 0 is on the
  symmetric grid;
* an input quantizer: an :class:`~slimkit.quant.lsq.LSQQuantizer` child named
  ``input_quantizer`` (unsigned, per tensor) called by a forward pre-hook. With
  ``method="lsq_plus"`` its zero point is learned too.

Weight quantizers are initialized by ``apply``; input quantizers by
``initialize(model, loader, num_batches)`` (``init="ptq"``: min/max over the batches,
``init="lsq"``: LSQ's ``2 * mean(|x|) / sqrt(qmax)`` over the batches); one never initialized
takes LSQ's init from its first batch (e.g. under a :class:`~slimkit.core.compressor.Compressor`,
which does not call ``initialize``).

Under ``DistributedDataParallel`` each rank initializes from its own batches and the statistics
(min, max, sum of ``|x|``, count) are all-reduced first, so every rank starts from the same
qparams (a first-batch init then runs collectively: every rank must make that first forward).
The learned scales and zero points are parameters of the model, so DDP averages their gradients
and they stay identical. ``step(step)`` freezes BatchNorm running statistics
(momentum 0) from step ``freeze_bn_after``. ``finalize(model)`` bakes the fake-quantized weights
into plain parameters and removes the input quantizers: the returned model has quantized weights
and float activations (read the learned activation qparams with ``activation_qparams`` first).
Biases stay in float; BatchNorm is not folded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.config import Config
from slimkit.core.scope import (
    WEIGHT_LAYER_NAMES,
    Scope,
    Selection,
    is_weight_layer,
    module_type_name,
)
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.distributed import all_reduce_, check_unsharded, is_distributed
from slimkit.errors import ConfigError, StateError
from slimkit.quant.fake import activation_spec, weight_spec
from slimkit.quant.lsq import LSQQuantizer

__all__ = [
    "INPUT_QUANTIZER",
    "QATConfig",
    "QuantizationAwareTraining",
    "input_quantizer_of",
    "lsq_weight_quantizer_of",
]

INPUT_QUANTIZER = "input_quantizer"
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
Bits = Annotated[int, Field(ge=2, le=8)]


class QATConfig(Config):
    """Quantization-aware training of the scoped Conv/Linear weights and inputs.

    ``method``: ``"lsq"`` learns scales, ``"lsq_plus"`` also learns the activations' zero
    points, ``"ste"`` keeps the initial scales fixed (straight-through only). ``init``:
    ``"ptq"`` takes min/max ranges (weights: per channel; activations: over the calibration
    batches), ``"lsq"`` LSQ's data init. ``freeze_bn_after``: optimizer steps after which
    BatchNorm running statistics stop updating (None: never).
    """

    kind: Literal["qat"] = "qat"
    scope: Scope = Scope()
    wbits: Bits = 8
    abits: Bits = 8
    method: Literal["lsq", "lsq_plus", "ste"] = "lsq"
    init: Literal["ptq", "lsq"] = "ptq"
    freeze_bn_after: Annotated[int, Field(ge=0)] | None = None


def lsq_weight_quantizer_of(module: nn.Module) -> LSQQuantizer | None:
    """The :class:`LSQQuantizer` parametrizing ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, LSQQuantizer)), None)


def input_quantizer_of(module: nn.Module) -> LSQQuantizer | None:
    """The input :class:`LSQQuantizer` QAT attached to ``module``, if any."""
    quantizer = module._modules.get(INPUT_QUANTIZER)
    return quantizer if isinstance(quantizer, LSQQuantizer) else None


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: fake-quantize the first positional input."""
    quantizer = input_quantizer_of(module)
    if quantizer is None or not args:
        return None
    if quantizer.enabled and not quantizer.is_initialized() and is_distributed():
        _init_lsq_everywhere(quantizer, args[0])  # LSQ's first-batch init over every rank's batch
    return (quantizer(args[0]), *args[1:])


class _InputStats:
    """Running min, max and mean |x| of one input, for ``initialize``."""

    def __init__(self) -> None:
        self.low, self.high = float("inf"), float("-inf")
        self.abs_sum, self.count = 0.0, 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        self.low = min(self.low, float(x.min()))
        self.high = max(self.high, float(x.max()))
        self.abs_sum += float(x.abs().sum())
        self.count += x.numel()


def _synchronize(stats: list[_InputStats]) -> None:
    """Merge every rank's statistics (MIN/MAX of the extremes, SUM of |x| and counts)."""
    if not is_distributed() or not stats:
        return
    extremes = torch.tensor([[-s.low, s.high] for s in stats], dtype=torch.float64)
    sums = torch.tensor([[s.abs_sum, float(s.count)] for s in stats], dtype=torch.float64)
    all_reduce_(extremes, "max")
    all_reduce_(sums, "sum")
    for s, (low, high), (abs_sum, count) in zip(
        stats, extremes.tolist(), sums.tolist(), strict=True
    ):
        s.low, s.high, s.abs_sum, s.count = -low, high, abs_sum, int(count)


@torch.no_grad()
def _init_lsq_everywhere(quantizer: LSQQuantizer, x: torch.Tensor) -> None:
    """:meth:`LSQQuantizer.init_lsq` (per tensor) on the union of every rank's ``x``."""
    stats = _InputStats()
    stats(quantizer, (x,))
    _synchronize([stats])
    spec = quantizer.spec
    scale = max(2 * stats.abs_sum / max(1, stats.count) / math.sqrt(spec.qmax), 1e-8)
    if spec.symmetric:
        zero_point = float(quantizer._symmetric_zero_point())
    else:
        zero_point = min(max(round(spec.qmin - min(stats.low, 0.0) / scale), spec.qmin), spec.qmax)
    quantizer._set(torch.tensor(scale), torch.tensor(float(zero_point)))


@register_technique
class QuantizationAwareTraining(Technique):
    """See :class:`QATConfig` and the module docstring.

    Life cycle: ``apply(model)`` -> ``initialize(model, loader)`` -> train, calling
    ``step(step)`` -> ``finalize(model)``.
    """

    kind = "qat"
    config_class = QATConfig
    config: QATConfig

    def __init__(self, config: QATConfig | None = None) -> None:
        super().__init__(QATConfig() if config is None else config)
        self._hooks: list[Any] = []
        self._bn_momenta: dict[nn.Module, float | None] = {}
        self.initialized = False
        self._final_summary: TechniqueSummary | None = None

    def plan(self, model: nn.Module) -> Selection:
        return self.config.scope.select(
            model,
            is_weight_layer,
            technique=self.kind,
            describe_supported=WEIGHT_LAYER_NAMES,
        )

    def apply(self, model: nn.Module) -> None:
        if self._already_applied(model):
            return
        check_unsharded(model, self.kind)
        selection = self.plan(model)
        for name, module in selection.selected:
            if lsq_weight_quantizer_of(module) is not None or input_quantizer_of(module):
                raise StateError(f"{self.kind}: module {name!r} is already quantized")
        learn = self.config.method != "ste"
        for _, module in selection.selected:
            spec = weight_spec(self.config.wbits)
            quantizer = LSQQuantizer(spec, module.weight.shape[0], learn_scale=learn)
            weight = module.weight.detach()  # after any pruning mask
            if self.config.init == "ptq":
                quantizer.init_from_tensor_range(weight)
            else:
                quantizer.init_lsq(weight)
            parametrize.register_parametrization(module, "weight", quantizer)
            module.add_module(
                INPUT_QUANTIZER,
                LSQQuantizer(
                    activation_spec(self.config.abits),
                    learn_scale=learn,
                    learn_zero_point=self.config.method == "lsq_plus",
                    split_batch=True,
                ),
            )
            self._hooks.append(module.register_forward_pre_hook(_quantize_input))
        self.selection, self._model = selection, model

    def _layers(self) -> list[tuple[str, nn.Module]]:
        return list(self._require_applied().selected)

    @torch.no_grad()
    def initialize(
        self, model: nn.Module, loader: Iterable[Any], num_batches: int | None = 1
    ) -> nn.Module:
        """Initialize the input quantizers from ``num_batches`` batches (eval mode, no grad).

        Batches are tensors or ``(inputs, ...)`` tuples. Input quantizers pass data through
        while it is observed; weight quantizers stay on, so later layers see quantized weights.
        Under ``torch.distributed`` call it on every rank with that rank's batches: the
        statistics are all-reduced, so every rank sets the same qparams.
        """
        if model is not self._model:
            raise StateError(f"{self.kind}: initialize the model this technique was applied to")
        if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
            raise ConfigError(f"num_batches must be a positive int or None, got {num_batches!r}")
        layers = self._layers()
        stats = {name: _InputStats() for name, _ in layers}
        handles = []
        for name, module in layers:
            input_quantizer_of(module).enabled = False
            handles.append(module.register_forward_pre_hook(stats[name]))
        training = model.training
        model.eval()
        seen = 0
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        try:
            for batch in itertools.islice(loader, num_batches):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(inputs, torch.Tensor):
                    raise ConfigError(
                        "initialize: batches must be tensors or (inputs, ...) tuples, got "
                        f"{type(inputs).__name__}"
                    )
                model(inputs.to(device))
                seen += 1
        finally:
            for handle in handles:
                handle.remove()
            for _, module in layers:
                input_quantizer_of(module).enabled = True
            model.train(training)
        if int(all_reduce_(torch.tensor(seen), "sum")) == 0:  # over every rank
            raise ConfigError("initialize: the loader yielded no batches")
        _synchronize([stats[name] for name, _ in layers])
        for name, module in layers:
            self._init_input(name, input_quantizer_of(module), stats[name])
        self.initialized = True
        return model

    def before_training(
        self, model: nn.Module, batches: Iterable[Any], *, progress: bool = False
    ) -> bool:
        """Initialise the input quantizers from ``batches`` (see :meth:`initialize`)."""
        self.initialize(model, batches, num_batches=None)
        return True

    def _init_input(self, name: str, quantizer: LSQQuantizer, stats: _InputStats) -> None:
        if stats.count == 0:
            raise StateError(
                f"{self.kind}: layer {name!r} saw no data during initialize (a branch the "
                "batches never took)"
            )
        low, high = torch.tensor(stats.low), torch.tensor(stats.high)
        if self.config.init == "ptq":
            quantizer.init_from_range(low, high)
            return
        scale = max(2 * stats.abs_sum / stats.count / quantizer.spec.qmax**0.5, 1e-8)
        zero_point = round(float(torch.clamp(-low.clamp(max=0.0) / scale, 0, quantizer.spec.qmax)))
        quantizer._set(torch.tensor(scale), torch.tensor(float(zero_point)))

    def step(self, step: int) -> bool:
        """Freeze BatchNorm running statistics once ``step >= freeze_bn_after``."""
        super().step(step)
        limit = self.config.freeze_bn_after
        if limit is None or step < limit or self._bn_momenta or self._model is None:
            return False
        self.freeze_batchnorm()
        return True

    def freeze_batchnorm(self) -> None:
        """Stop BatchNorm running-statistic updates (momentum 0); ``finalize`` restores them."""
        self._require_applied()
        for module in self._model.modules():
            if isinstance(module, _BN_TYPES) and module not in self._bn_momenta:
                self._bn_momenta[module] = module.momentum
                module.momentum = 0.0

    @property
    def batchnorm_frozen(self) -> bool:
        return bool(self._bn_momenta)

    def quantizers(self) -> dict[str, tuple[LSQQuantizer, LSQQuantizer]]:
        """``{layer: (weight quantizer, input quantizer)}``."""
        return {
            name: (lsq_weight_quantizer_of(module), input_quantizer_of(module))
            for name, module in self._layers()
        }

    def activation_qparams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (scale, integer zero_point)}`` of each layer's input quantizer."""
        return {
            name: (q.scale.detach().abs().clone(), torch.round(q.zero_point.detach()).int())
            for name, (_, q) in self.quantizers().items()
        }

    def summary(self) -> TechniqueSummary:
        """Per-layer bits and learned scales (as they were at ``finalize`` once finalized)."""
        if self._final_summary is not None:
            return self._final_summary
        rows = [
            [
                name,
                module_type_name(module),
                self.config.wbits,
                self.config.abits,
                float(w.scale.detach().abs().mean()),
                float(a.scale.detach().abs()),
                float(a.zero_point.detach()),
            ]
            for (name, module), (w, a) in zip(
                self._layers(), self.quantizers().values(), strict=True
            )
        ]
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "type", "wbits", "abits", "mean_weight_scale", "input_scale", "zp"],
            rows=rows,
            totals={"layers": len(rows), "method": self.config.method},
            skipped=list(self._require_applied().skipped),
        )

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> nn.Module:
        """Bake fake-quantized weights into the parameters; remove input quantizers and hooks.

        A pruning mask under the quantizer stays in place (its technique removes it); the
        stored weight is the quantized, masked value, so it stays exactly 0 where pruned.
        """
        self._require_applied()
        self._final_summary = self.summary()
        for _, module in self._layers():
            quantized = module.weight.detach().clone()
            plist = module.parametrizations.weight
            if len(plist) == 1 and len(module.parametrizations) == 1:
                original = plist.original
                del module._modules["parametrizations"]
                module.__class__ = type(module).__bases__[0]  # keep the class other copies share
                module.register_parameter("weight", original)
                original.copy_(quantized)
            elif len(plist) == 1:  # another tensor of the module is parametrized too
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            else:
                index = next(i for i, p in enumerate(plist) if isinstance(p, LSQQuantizer))
                del plist[index]
                plist.original.copy_(quantized)
            del module._modules[INPUT_QUANTIZER]
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module, momentum in self._bn_momenta.items():
            module.momentum = momentum
        self._bn_momenta.clear()
        return model

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(initialized=self.initialized, batchnorm_frozen=self.batchnorm_frozen)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initialized = bool(state["initialized"])
        if state.get("batchnorm_frozen") and self._model is not None:
            self.freeze_batchnorm()
