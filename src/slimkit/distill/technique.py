"""Knowledge distillation as a technique: a frozen teacher guides the student during training.

::

    kd = Distillation(DistillationConfig(
        soft_label=SoftLabelConfig(temperature=4.0),
        pairs=[FeaturePairConfig(student="layer2", teacher="layer2", loss="hint")],
    ))
    kd.bind(teacher, task.forward)               # the runner: a model it will not train
    kd.example_inputs = task.example_inputs      # dry run: adapters exist right after apply
    compressor = Compressor([kd]).apply(student)
    optimizer = Adam([*student.parameters(), *kd.parameters()])   # adapters train too
    for batch in loader:
        outputs = task.forward(student, batch)
        loss = kd.config.task_weight * task.loss(outputs, batch) + compressor.loss(outputs, batch)
        ...
    plain = compressor.finalize()                # hooks removed, adapters dropped

``loss(outputs, batch)`` returns only the distillation part: the weighted sum of the configured
terms. The technique cannot scale the task loss itself; the training loop multiplies it by
``config.task_weight``. Student features are captured by forward hooks on the named modules
during the student's own forward; the teacher is run on the same batch under ``torch.no_grad()``
inside ``loss`` (through the bound ``forward``), and its features are captured the same way.

The teacher is frozen on ``bind`` (eval mode, ``requires_grad=False``) and put back in eval mode
whenever it is found in training mode. Trainable adapters (1x1 conv / Linear, see
:mod:`slimkit.distill.adapters`) bridge width differences for ``hint``, ``cosine`` and ``fsp``
terms; they are exposed as :attr:`Distillation.adapters` (an ``nn.ModuleDict``) and through
:meth:`Distillation.parameters`, which the training loop must add to its optimizer.

Adapter shapes are known only once features have been seen. With ``example_inputs`` (set by the
runner or a :class:`~slimkit.core.compressor.Compressor` given ``example_inputs``, or passed to
``apply``), ``apply`` runs the student and the teacher once (eval mode, no grad) and creates the
adapters then, and checks every term's shapes. Without them, adapters are created at the first
``loss`` call, and the optimizer must be built after that first batch (a ``RuntimeWarning`` says
so when ``parameters()`` was called too early). Because the dry run executes the student, list
``distill`` before techniques whose state initialises itself on the first forward (QAT's input
quantizers): the Compressor applies techniques in order.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from slimkit.core.scope import Selection, closest_names
from slimkit.core.technique import RunContext, Technique, TechniqueSummary, register_technique
from slimkit.distill.adapters import FeatureAdapter, make_adapter
from slimkit.distill.config import (
    DistillationConfig,
    FeaturePairConfig,
    FSPPairConfig,
    LossTerm,
    SoftLabelConfig,
    loss_terms,
)
from slimkit.distill.losses import (
    attention_transfer,
    cosine_embedding_loss,
    fsp_loss,
    hint_mse,
    soft_cross_entropy,
    soft_kl,
)
from slimkit.distill.teacher import freeze, frozen_copy, load_teacher
from slimkit.errors import ConfigError, ScopeError, StateError, UnsupportedModuleError

__all__ = [
    "Distillation",
    "DistillationConfig",
    "FSPPairConfig",
    "FeaturePairConfig",
    "Forward",
    "SoftLabelConfig",
    "default_forward",
]

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch) -> outputs``: how the task runs a model on one batch."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list batch."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise ConfigError(
        f"distill: cannot run a model on a {type(batch).__name__} batch; pass forward= to bind"
    )


def _as_tensor(name: str, output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModuleError(
        f"distill: module {name!r} returned {type(output).__name__}; a tensor (or a tuple "
        "starting with one) is needed"
    )


def _features(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dims of a feature shape that its adapter is built for."""
    return tuple(shape[1:]) if len(shape) == 4 else tuple(shape[-1:])


def _capture(store: dict[str, torch.Tensor], name: str, module: nn.Module, args, output) -> None:
    store[name] = _as_tensor(name, output)


def _logits(outputs: Any, side: str) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):  # {"loss": ..., "logits": ...}
        logits = outputs.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ConfigError(
        f"distill: soft labels need the {side}'s logits; its outputs are {type(outputs).__name__}"
    )


def _split_inputs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        if example and isinstance(example[-1], dict):
            return tuple(example[:-1]), dict(example[-1])
        return tuple(example), {}
    return (example,), {}


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _on(values: Any, device: torch.device) -> Any:
    """A tuple or dict of example inputs with its tensors moved to ``device``."""
    if isinstance(values, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def _check_names(side: str, model: nn.Module, wanted: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for name in wanted:
        if name not in modules:
            near = closest_names(name, [n for n in modules if n])
            hint = f"; closest names: {', '.join(near)}" if near else ""
            raise ScopeError(f"distill: the {side} has no module {name!r}{hint}")
    return {name: modules[name] for name in wanted}


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


@register_technique
class Distillation(Technique):
    """See :class:`DistillationConfig` and the module docstring."""

    kind = "distill"
    config_class = DistillationConfig
    config: DistillationConfig

    def __init__(
        self,
        config: DistillationConfig,
        *,
        teacher: nn.Module | None = None,
        forward: Forward | None = None,
        example_inputs: Any = None,
    ) -> None:
        super().__init__(config)
        self.example_inputs = example_inputs
        self.terms = loss_terms(config)
        self.teacher: nn.Module | None = None
        self.forward: Forward = default_forward
        self.adapters = nn.ModuleDict()
        self._adapter_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._last: dict[str, torch.Tensor | float] = {}
        self._parameters_requested = False
        self._adapter_params = 0
        self._finalized = False
        self._rebuilt = False  # an adapter was rebuilt since the last step
        self._replaced = False
        if teacher is not None:
            self.bind(teacher, forward)

    # --- wiring -----------------------------------------------------------------------------
    @property
    def student_names(self) -> list[str]:
        return _unique([n for term in self.terms for n in term.student])

    @property
    def teacher_names(self) -> list[str]:
        return _unique([n for term in self.terms for n in term.teacher])

    def bind(self, teacher: nn.Module, forward: Forward | None = None) -> Distillation:
        """Give the teacher (a model the caller will not train) and the task's ``forward``.

        The teacher is frozen in place (eval mode, ``requires_grad=False``). Call before ``apply``.
        """
        if self._model is not None:
            raise StateError(f"{self.kind}: bind the teacher before apply(model)")
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"{self.kind}: the teacher must be an nn.Module, got {teacher!r}")
        self.teacher = freeze(teacher)
        self.forward = forward if forward is not None else default_forward
        return self

    def _require_teacher(self) -> nn.Module:
        if self.teacher is None:
            raise StateError(
                f"{self.kind}: no teacher; call bind(teacher, forward) before apply/loss"
            )
        return self.teacher

    def bind_run(self, context: RunContext) -> None:
        """Pick the teacher ``config.teacher`` names from the run: a frozen copy of the baseline,
        of the model entering the stage, or a checkpoint loaded into a fresh task model."""
        choice = self.config.teacher
        if choice == "baseline":
            teacher = frozen_copy(context.baseline)
        elif choice == "previous_stage":
            teacher = frozen_copy(context.stage_input)
        else:
            teacher = load_teacher(context.make_model(), choice)
        self.bind(teacher, context.forward)

    @property
    def task_loss_weight(self) -> float:
        return self.config.task_weight

    @property
    def parameters_replaced(self) -> bool:
        """True right after a step during which an adapter was rebuilt because its student layer
        changed width (iterative structured pruning): rebuild the optimizer to train it."""
        return self._replaced

    def step(self, step: int) -> bool:
        self._replaced, self._rebuilt = self._rebuilt, False
        return super().step(step)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' trainable parameters: add them to the optimizer with the student's.

        Empty when no term needs a trainable adapter, or before the adapters exist (no
        ``example_inputs`` and no batch seen yet).
        """
        self._parameters_requested = True
        return iter([p for p in self.adapters.parameters() if p.requires_grad])

    # --- life cycle -------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> Selection:
        """The student modules whose outputs are read; teacher names are checked when bound."""
        modules = _check_names("student", model, self.student_names)
        if self.teacher is not None:
            _check_names("teacher", self.teacher, self.teacher_names)
        return Selection(selected=list(modules.items()))

    def apply(self, model: nn.Module, example_inputs: Any = None) -> None:
        """Hook the named student and teacher modules; build adapters from a dry run if example
        inputs are known (argument, or the ``example_inputs`` attribute)."""
        if self._already_applied(model):
            return
        if self._finalized:
            raise StateError(f"{self.kind}: this technique is finalized; make a new one")
        teacher = self._require_teacher()
        if teacher is model:
            raise ConfigError(
                f"{self.kind}: the teacher is the student itself; pass a frozen copy "
                "(slimkit.distill.frozen_copy(model)) made before compression"
            )
        student_params = {id(p) for p in model.parameters()}
        if any(id(p) in student_params for p in teacher.parameters()):
            raise ConfigError(f"{self.kind}: the teacher shares parameters with the student")
        selection = self.plan(model)
        teacher_modules = _check_names("teacher", teacher, self.teacher_names)
        for name, module in selection.selected:
            hook = functools.partial(_capture, self._student_feats, name)
            self._handles.append(module.register_forward_hook(hook))
        for name, module in teacher_modules.items():
            hook = functools.partial(_capture, self._teacher_feats, name)
            self._handles.append(module.register_forward_hook(hook))
        self.selection, self._model = selection, model
        example = example_inputs if example_inputs is not None else self.example_inputs
        if example is not None:
            try:
                self._dry_run(model, teacher, example)
            except BaseException:
                self._remove_hooks()
                self._clear()
                self.adapters = nn.ModuleDict()
                self._adapter_shapes.clear()
                self.selection, self._model = None, None
                raise

    @torch.no_grad()
    def _dry_run(self, student: nn.Module, teacher: nn.Module, example: Any) -> None:
        """Run both models once (eval mode, no grad), build adapters and check every term."""
        args, kwargs = _split_inputs(example)
        modes = {m: m.training for m in student.modules()}
        self._clear()
        try:
            student.eval()
            try:
                s_out = student(*_on(args, _device_of(student)), **_on(kwargs, _device_of(student)))
            finally:
                for module, mode in modes.items():
                    module.training = mode
            teacher.eval()
            t_out = teacher(*_on(args, _device_of(teacher)), **_on(kwargs, _device_of(teacher)))
            why = "not run by the model's forward on example_inputs?"
            self._features(self._student_feats, self.student_names, "student", why)
            self._features(self._teacher_feats, self.teacher_names, "teacher", why)
            self._build_adapters()
            self._combine(s_out, t_out)
        finally:
            self._clear()
            self._last = {}

    def _features(
        self,
        store: dict[str, torch.Tensor],
        names: list[str],
        side: str,
        why: str = "call loss() right after the student's forward on the same batch",
    ) -> None:
        missing = [n for n in names if n not in store]
        if missing:
            raise StateError(
                f"{self.kind}: no output captured from {side} module(s) {', '.join(missing)}; "
                + why
            )

    def _build_adapters(self) -> list[str]:
        """Create the adapters that do not exist yet from the captured shapes; their keys.

        An adapter whose student feature changed width since it was built is rebuilt (not
        listed): :attr:`parameters_replaced` tells the loop after the next step."""
        created = []
        for term in self.terms:
            for index, key in enumerate(term.adapters):
                if not key:
                    continue
                s_shape = tuple(self._student_feats[term.student[index]].shape)
                t_shape = tuple(self._teacher_feats[term.teacher[index]].shape)
                if term.loss == "fsp":  # FSP matrices need equal channels, any spatial size
                    if len(s_shape) != 4 or len(t_shape) != 4:
                        raise ConfigError(
                            f"{self.kind}: {term.key}: FSP needs 4-D feature maps, got student "
                            f"shape {s_shape} and teacher shape {t_shape}"
                        )
                    t_shape = (t_shape[0], t_shape[1], *s_shape[2:])
                if key in self.adapters:
                    if not self._resized(key, s_shape):
                        continue
                    old = self._adapter_shapes[key][0]
                    warnings.warn(
                        f"{self.kind}: {term.key}: the student feature changed from "
                        f"{_features(old)} to {_features(s_shape)} (structured pruning); its "
                        "adapter starts afresh",
                        stacklevel=3,
                    )
                    del self.adapters[key]
                    self._rebuilt = True  # parameters_replaced after this step: no warning
                    self._add_adapter(key, s_shape, t_shape)
                    continue
                self._add_adapter(key, s_shape, t_shape)
                created.append(key)
        return created

    def _resized(self, key: str, s_shape: tuple[int, ...]) -> bool:
        """Whether the dims an adapter depends on (channels and map size of a 4-D feature, the
        last dim otherwise; never batch or token counts) differ from the adapter's."""
        return _features(self._adapter_shapes[key][0]) != _features(s_shape)

    def _add_adapter(self, key: str, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        try:
            adapter = make_adapter(s_shape, t_shape, seed=len(self._adapter_shapes))
        except ConfigError as exc:
            raise ConfigError(f"{self.kind}: adapter {key}: {exc}") from None
        student = self._require_student()
        parameter = next(student.parameters(), None)
        if parameter is not None:
            adapter = adapter.to(device=parameter.device, dtype=parameter.dtype)
        self.adapters[key] = adapter
        self._adapter_shapes[key] = (s_shape, t_shape)

    def _require_student(self) -> nn.Module:
        if self._model is None:
            raise StateError(f"{self.kind}: call apply(model) first")
        return self._model

    def _clear(self) -> None:
        self._student_feats.clear()
        self._teacher_feats.clear()

    def loss(self, outputs: Any = None, batch: Any = None) -> torch.Tensor | float:
        """The distillation part of the loss: ``sum_i weight_i * term_i`` (not the task loss).

        Runs the teacher on ``batch`` under ``torch.no_grad()`` and reads the features the
        student's last forward left in the hooks; ``outputs`` are the student's logits (a tensor,
        an object with ``.logits``, or a tuple starting with them).
        """
        if self._finalized:
            raise StateError(f"{self.kind}: this technique is finalized")
        self._require_student()
        teacher = self._require_teacher()
        self._features(self._student_feats, self.student_names, "student")
        if teacher.training:
            teacher.eval()
        try:
            with torch.no_grad():
                t_out = self.forward(teacher, batch)
            self._features(self._teacher_feats, self.teacher_names, "teacher")
            created = self._build_adapters()
            if (
                created
                and self._parameters_requested
                and any(self.adapters[k].trainable for k in created)
            ):
                warnings.warn(
                    f"{self.kind}: adapters {', '.join(created)} were created at the first batch, "
                    "after parameters() was read: they are not in the optimizer. Set "
                    "example_inputs before apply(), or build the optimizer after one batch.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self._combine(outputs, t_out)
        finally:
            self._clear()

    def _combine(self, s_out: Any, t_out: Any) -> torch.Tensor:
        total: torch.Tensor | None = None
        last: dict[str, torch.Tensor | float] = {}
        for term in self.terms:
            try:
                value = self._term(term, s_out, t_out)
            except ConfigError as exc:
                raise ConfigError(f"{self.kind}: {term.key}: {exc}") from None
            last[term.key] = value.detach()
            weighted = term.weight * value
            total = weighted if total is None else total + weighted
        if total is None:  # unreachable: the config has at least one term
            raise StateError(f"{self.kind}: no loss term configured")
        last["total"] = total.detach()
        self._last = last
        return total

    def _term(self, term: LossTerm, s_out: Any, t_out: Any) -> torch.Tensor:
        if term.loss in ("kl", "cross_entropy"):
            soft = self.config.soft_label
            student = _logits(s_out, "student")
            teacher = _logits(t_out, "teacher").to(student.device)
            fn = soft_kl if soft.loss == "kl" else soft_cross_entropy
            return fn(student, teacher, soft.temperature)
        s_feats = [self._student_feats[n] for n in term.student]
        t_feats = [
            self._teacher_feats[n].to(s.device) for n, s in zip(term.teacher, s_feats, strict=True)
        ]
        adapters: list[FeatureAdapter | None] = [
            self._adapter(key, s) if key else None
            for key, s in zip(term.adapters, s_feats, strict=True)
        ]
        if term.loss == "attention":
            return attention_transfer(s_feats[0], t_feats[0])
        if term.loss == "fsp":
            a0, a1 = (a.adapt_student(s) for a, s in zip(adapters, s_feats, strict=True))
            return fsp_loss((a0, a1), (t_feats[0], t_feats[1]))
        student, teacher = adapters[0](s_feats[0], t_feats[0])
        fn = hint_mse if term.loss == "hint" else cosine_embedding_loss
        return fn(student, teacher)

    def _adapter(self, key: str, feature: torch.Tensor) -> FeatureAdapter:
        adapter = self.adapters[key]
        parameter = next(adapter.parameters(), None)
        if parameter is not None and parameter.device != feature.device:
            adapter.to(feature.device)  # keeps the Parameter objects the optimizer holds
        return adapter

    def finalize(self, model: nn.Module) -> nn.Module:
        """Remove every hook and drop the adapters and the teacher; the student is unchanged."""
        if self._finalized:
            return model
        self._require_student()
        self._remove_hooks()
        self._clear()
        self._adapter_params = sum(p.numel() for p in self.adapters.parameters())
        self.adapters = nn.ModuleDict()
        self._adapter_shapes.clear()
        self.teacher = None
        self._finalized = True
        return model

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- reporting --------------------------------------------------------------------------
    def last_losses(self) -> dict[str, float]:
        """Unweighted value of each term at the last ``loss`` call, and the weighted ``total``."""
        return {k: float(v) for k, v in self._last.items()}

    def scalars(self) -> dict[str, float]:
        """Unweighted loss of each term and ``total`` (TensorBoard prefixes ``distill/``)."""
        if self._finalized:
            return {}
        return dict(self.last_losses())

    def summary(self) -> TechniqueSummary:
        last = self.last_losses()
        rows = [
            [
                term.key,
                ",".join(term.student) or "(logits)",
                ",".join(term.teacher) or "(logits)",
                term.weight,
                last.get(term.key, float("nan")),
            ]
            for term in self.terms
        ]
        params = (
            self._adapter_params
            if self._finalized
            else sum(p.numel() for p in self.adapters.parameters())
        )
        return TechniqueSummary(
            technique=self.kind,
            columns=["term", "student", "teacher", "weight", "last_loss"],
            rows=rows,
            totals={
                "loss": last.get("total", float("nan")),
                "task_weight": self.config.task_weight,
                "teacher": self.config.teacher,
                "adapter_params": params,
            },
        )

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            adapter_shapes={
                k: {"student": list(s), "teacher": list(t)}
                for k, (s, t) in self._adapter_shapes.items()
            },
            adapters={k: v.detach().clone() for k, v in self.adapters.state_dict().items()},
            last=self.last_losses(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore adapters (created from the saved shapes when missing) and the last losses.

        Call after ``apply``; build the optimizer afterwards so it holds the adapters. Without
        ``apply`` (resume restoring a finished stage, whose adapters ``finalize`` dropped) only
        the step count and the last losses are restored.
        """
        super().load_state_dict(state)
        if self._model is None:
            self._last = {k: float(v) for k, v in state.get("last", {}).items()}
            return
        for key, shapes in state.get("adapter_shapes", {}).items():
            s_shape, t_shape = tuple(shapes["student"]), tuple(shapes["teacher"])
            if key in self._adapter_shapes:
                if self._adapter_shapes[key] != (s_shape, t_shape):
                    raise StateError(
                        f"{self.kind}: saved adapter {key} maps {s_shape} -> {t_shape}, this one "
                        f"maps {self._adapter_shapes[key][0]} -> {self._adapter_shapes[key][1]}"
                    )
                continue
            self._add_adapter(key, s_shape, t_shape)
        saved = state.get("adapters", {})
        if not saved:  # saved before any adapter existed: keep this run's (fresh) adapters
            self._last = {k: float(v) for k, v in state.get("last", {}).items()}
            return
        try:
            self.adapters.load_state_dict(saved, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise StateError(f"{self.kind}: adapter state does not fit: {detail}") from None
        self._last = {k: float(v) for k, v in state.get("last", {}).items()}
