"""Structured pruning: remove whole channels and attention heads, so the model physically shrinks.

Torch-Pruning's dependency graph finds the groups of tensor slices that must go together (a
conv's filters, the next layer's inputs, BatchNorm entries, residual partners, SE gates, a ViT's
``cls_token``...). slimkit owns the rest: which groups the :class:`~slimkit.core.scope.Scope`
allows, the per-channel importance (:mod:`slimkit.prune.channel_importance`), how many channels
each group keeps (``uniform`` or ``global`` ranking, rounded to ``round_to``), whole-head removal
for attention, and the record of what was kept (:mod:`slimkit.prune.manifest`).

The final classifier's outputs (any module whose output is a model output) are never pruned.
A group that cannot be handled is skipped with its reason, never dropped silently: it couples
with a layer the scope excludes, contains a module type slimkit cannot slice, is an attention
projection while ``prune_heads`` is off, or pruning it broke the forward pass (rolled back).

The model is traced with ``example_inputs`` (a tuple; a trailing dict holds keyword arguments),
given to the constructor or :meth:`StructuredPruning.apply`, or zeros of ``input_shape``.
Pruning replaces parameters: build the optimizer after ``apply``.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Scope, Selection
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.errors import StateError
from slimkit.prune.channel_importance import (
    CHANNEL_IMPORTANCES,
    ChannelGroup,
    channel_group,
    dependency_graph,
    first_line,
    global_prune_counts,
    heads_to_remove,
    kept_count,
    lowest,
    make_channel_importance,
)
from slimkit.prune.manifest import (
    LayerRecord,
    PruningManifest,
    TensorRecord,
    apply_record,
    record_slicing,
    undo,
)

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
SUPPORTED = (*ROOT_TYPES, nn.Embedding)
SLICEABLE = (
    *SUPPORTED,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)


class StructuredPruningConfig(Config):
    """Remove a ``sparsity`` share of the channels of every prunable group (one shot).

    ``allocation="uniform"`` prunes each group by ``sparsity``; ``"global"`` ranks all channels
    together (scores divided by their group's mean) and prunes at most ``max_layer_sparsity`` of
    any group. Kept counts are rounded up to a multiple of ``round_to`` (1 = off) where the group
    has at least ``round_to`` channels. With ``prune_heads`` attention loses whole heads
    (``round(sparsity * heads)``, at least one head stays) and head dims are never pruned.
    """

    kind: Literal["structured_prune"] = "structured_prune"
    scope: Scope = Scope()
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)]
    importance: str = "l1"
    allocation: Literal["uniform", "global"] = "uniform"
    max_layer_sparsity: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    round_to: Annotated[int, Field(ge=1)] = 8
    prune_heads: bool = True
    seed: int = 0
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] | None = None

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, value: str) -> str:
        if value not in CHANNEL_IMPORTANCES:
            raise ValueError(f"expected one of {', '.join(sorted(CHANNEL_IMPORTANCES))}")
        return value


# --- attention ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """One multi-head attention: its q/k/v projections (outputs = heads * head_dim), the output
    projection, and the attributes to set for a new head count."""

    name: str
    projections: tuple[str, str, str]
    output: str
    num_heads: int
    head_dim: int
    attributes: Callable[[int], dict[str, int]]


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _explicit_attention(name: str, module: nn.Module, model: nn.Module) -> AttentionSpec | None:
    """``q_proj``/``k_proj``/``v_proj``/``out_proj`` with ``num_heads``/``head_dim``
    (slimkit's ViT, timm-like code)."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return None
    if not isinstance(heads, int) or not isinstance(dim, int):
        return None
    q, k, v, o = (_join(name, n) for n in names)
    return AttentionSpec(name, (q, k, v), o, heads, dim, lambda h: {"num_heads": h})


def _hf_self_attention(name: str, module: nn.Module, model: nn.Module) -> AttentionSpec | None:
    """Hugging Face BERT-style ``query``/``key``/``value`` with the output projection at the
    parent's ``output.dense``."""
    heads, dim = (
        getattr(module, "num_attention_heads", None),
        getattr(module, "attention_head_size", None),
    )
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")):
        return None
    if not isinstance(heads, int) or not isinstance(dim, int):
        return None
    parent_name = name.rpartition(".")[0]
    out = getattr(getattr(model.get_submodule(parent_name), "output", None), "dense", None)
    if not isinstance(out, nn.Linear):
        return None
    total = hasattr(module, "all_head_size")

    def attributes(h: int) -> dict[str, int]:
        return {"num_attention_heads": h, **({"all_head_size": h * dim} if total else {})}

    qkv = tuple(_join(name, n) for n in ("query", "key", "value"))
    return AttentionSpec(name, qkv, _join(parent_name, "output.dense"), heads, dim, attributes)


ATTENTION_ADAPTERS: list[Callable[[str, nn.Module, nn.Module], AttentionSpec | None]] = [
    _explicit_attention,
    _hf_self_attention,
]
"""Recognisers of attention modules, tried in order; append your own."""


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class GroupPlan:
    """One dependency group: what will be removed (root channel indices) or why it is skipped."""

    root: str
    kind: Literal["channels", "heads"]
    channels: int
    members: list[str]
    prune: list[int] = field(default_factory=list)
    skip: str | None = None
    note: str | None = None
    attention: str | None = None
    heads: int = 0
    head_dim: int = 0


@dataclass
class StructuredPlan:
    """Every group of a model, the auto-protected output layers and scope-skipped modules."""

    groups: list[GroupPlan]
    output_layers: list[str]
    skipped_modules: list[tuple[str, str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"output layers (never pruned): {', '.join(self.output_layers) or '-'}"]
        for g in self.groups:
            status = f"skip: {g.skip}" if g.skip else f"{g.channels} -> {g.channels - len(g.prune)}"
            lines.append(f"  {g.root} [{g.kind}, {len(g.members)} members] {status}")
        lines += [f"  {name}: skipped: {why}" for name, why in self.skipped_modules]
        return "\n".join(lines)


def _split_inputs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if args and isinstance(args[-1], dict):
        return args[:-1], dict(args[-1])
    return args, {}


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for item in items for t in _leaves(item)]


def _run(model: nn.Module, args: tuple, kwargs: dict, hooks: bool = False) -> tuple[Any, set]:
    """Eval-mode forward (training flags restored); with ``hooks`` also the names of the modules
    whose output tensor is a model output (weak references: no activation is kept alive)."""
    modes = {m: m.training for m in model.modules()}
    produced: list[tuple[str, weakref.ref]] = []

    def hook(module: nn.Module, _args: Any, out: Any, name: str = "") -> None:
        produced.extend((name, weakref.ref(t)) for t in _leaves(out))

    handles = [
        module.register_forward_hook(functools.partial(hook, name=name))
        for name, module in (model.named_modules() if hooks else ())
        if name and any(True for _ in module.parameters(recurse=False))
    ]
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    outputs = _leaves(out)
    return out, {name for name, ref in produced if any(ref() is t for t in outputs)}


def _skip_reason(
    view: ChannelGroup, selected: set[str], scope_skipped: dict[str, str], outputs: set[str]
) -> str | None:
    for m in view.members:
        if isinstance(m.module, nn.Module) and not isinstance(m.module, SLICEABLE):
            return f"{m.name} ({type(m.module).__name__}) is not supported by structured_prune"
        if len(set(m.idxs)) != len(m.idxs):
            return f"{m.name}: channels map ambiguously through a reshape"
        if m.role != "out" or not isinstance(m.module, SUPPORTED):
            continue
        if m.name in outputs:
            return f"{m.name} is an output layer: its outputs are the model's outputs"
        if m.name not in selected:
            why = scope_skipped.get(m.name, "not selected by the scope")
            return f"{m.name}: {why}" if m.name == view.root else f"couples with {m.name}: {why}"
    return None


# --- the technique --------------------------------------------------------------------------------


@register_technique
class StructuredPruning(Technique):
    """See :class:`StructuredPruningConfig` and the module docstring."""

    kind = "structured_prune"
    config_class = StructuredPruningConfig
    config: StructuredPruningConfig

    def __init__(self, config: StructuredPruningConfig, *, example_inputs: Any = None) -> None:
        super().__init__(config)
        self.example_inputs = example_inputs
        self.manifest: PruningManifest | None = None
        self.last_plan: StructuredPlan | None = None
        self._totals: dict[str, Any] = {}

    def _inputs(self, example_inputs: Any) -> tuple[tuple, dict]:
        example = example_inputs if example_inputs is not None else self.example_inputs
        if example is None and self.config.input_shape is not None:
            example = (torch.zeros(self.config.input_shape),)
        if example is None:
            raise StateError(
                f"{self.kind}: example inputs are needed to trace the model; pass "
                "example_inputs= to the constructor or apply(), or set input_shape"
            )
        return _split_inputs(example)

    def plan_groups(self, model: nn.Module, example_inputs: Any = None) -> StructuredPlan:
        """Every group with the channels it would lose or its skip reason; no side effects."""
        return self._analyse(model, *self._inputs(example_inputs))[0]

    def plan(self, model: nn.Module, example_inputs: Any = None) -> Selection:
        plan = self.plan_groups(model, example_inputs)
        modules = dict(model.named_modules())
        selection = Selection(skipped=list(plan.skipped_modules))
        for g in plan.groups:
            if g.skip:
                selection.skipped.append((g.root, g.skip))
            elif g.prune:
                selection.selected.append((g.root, modules[g.root]))
        return selection

    def _analyse(
        self, model: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[StructuredPlan, Any, dict]:
        cfg = self.config
        selection = cfg.scope.select(
            model,
            lambda m: isinstance(m, SUPPORTED),
            technique=self.kind,
            describe_supported="Conv1d/2d/3d, Linear, Embedding",
        )
        _, outputs = _run(model, args, kwargs, hooks=True)
        graph = dependency_graph(model, args, kwargs)
        specs: dict[str, AttentionSpec] = {}
        for name, module in model.named_modules():
            spec = next((s for a in ATTENTION_ADAPTERS if (s := a(name, module, model))), None)
            for proj in spec.projections if spec else ():
                specs[proj] = spec
        importance = make_channel_importance(cfg.importance, seed=cfg.seed)
        plans, roots, scored = [], {}, []
        for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
            view = channel_group(group)
            members = [f"{m.name}:{m.role}" for m in view.members]
            plan = GroupPlan(view.root, "channels", view.channels, members)
            plans.append(plan)
            roots[id(plan)] = (group[0].dep.target.module, group[0].dep.handler)
            plan.skip = _skip_reason(view, set(selection.names), dict(selection.skipped), outputs)
            outs = {m.name for m in view.members if m.role == "out"}
            spec = next((specs[n] for n in sorted(outs) if n in specs), None)
            if spec is not None:
                plan.kind, plan.attention = "heads", spec.name
                plan.heads, plan.head_dim = spec.num_heads, spec.head_dim
                ins = {m.name for m in view.members if m.role == "in"}
                if not cfg.prune_heads:
                    plan.skip = (
                        plan.skip or "attention projections: set prune_heads to remove heads"
                    )
                elif not (set(spec.projections) <= outs and spec.output in ins) or (
                    view.root not in spec.projections
                    or view.channels != spec.num_heads * spec.head_dim
                ):
                    plan.skip = plan.skip or f"{spec.name}: projections are not coupled as expected"
            if plan.skip is None and view.channels < 2:
                plan.skip = "a single channel"
            if plan.skip is not None:
                continue
            scores = importance(view)
            if scores is None:
                plan.skip = "no weights to score"
                continue
            plan.note = importance.fallback_reason(view)
            scored.append((plan, scores, specs.get(view.root)))
        self._allocate(scored)
        self.last_plan = StructuredPlan(plans, sorted(outputs), list(selection.skipped))
        return self.last_plan, graph, {"roots": roots, "specs": {s.name: s for s in specs.values()}}

    def _allocate(self, scored: list[tuple[GroupPlan, torch.Tensor, AttentionSpec | None]]) -> None:
        cfg = self.config
        channel = [(p, s) for p, s, spec in scored if spec is None]
        if cfg.allocation == "global":
            counts = global_prune_counts(
                [s for _, s in channel], cfg.sparsity, cfg.max_layer_sparsity, cfg.round_to
            )
        else:
            counts = [
                p.channels - kept_count(p.channels, cfg.sparsity, cfg.round_to) for p, _ in channel
            ]
        for (plan, scores), count in zip(channel, counts, strict=True):
            plan.prune = lowest(scores, count)
        for plan, scores, spec in scored:
            if spec is not None:
                heads = lowest(
                    scores.reshape(spec.num_heads, spec.head_dim).sum(1),
                    heads_to_remove(spec.num_heads, cfg.sparsity),
                )
                plan.prune = [h * spec.head_dim + j for h in heads for j in range(spec.head_dim)]

    # --- apply ------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, example_inputs: Any = None) -> None:
        """Physically remove the planned channels and heads of ``model`` (in place, one shot)."""
        if self._already_applied(model):
            return
        args, kwargs = self._inputs(example_inputs)
        before, _ = _run(model, args, kwargs)
        plan, graph, extra = self._analyse(model, args, kwargs)
        todo = []
        for g in plan.groups:  # record everything before the graph's modules change
            if g.skip is None and g.prune:
                module, fn = extra["roots"][id(g)]
                try:
                    records = _group_records(graph, graph.get_pruning_group(module, fn, g.prune))
                except Exception as exc:
                    g.skip, g.prune = f"cannot be sliced: {first_line(exc)}", []
                    continue
                if g.attention is not None:
                    records.append(_heads_record(model, extra["specs"][g.attention], g))
                todo.append((g, records))
        modules = dict(model.named_modules())
        manifest = PruningManifest(technique=self.config.to_dict())
        for g, records in todo:
            log = []
            try:
                for record in records:
                    log += apply_record(modules[record.module], record)
                _run(model, args, kwargs)
            except Exception as exc:
                undo(log)
                g.skip, g.prune = f"broke the forward pass, rolled back: {first_line(exc)}", []
                continue
            for record in records:
                manifest.add(record)
        after, _ = _run(model, args, kwargs)
        shapes = [tuple(t.shape) for t in _leaves(before)], [tuple(t.shape) for t in _leaves(after)]
        if shapes[0] != shapes[1]:
            raise StateError(f"{self.kind}: output shapes changed from {shapes[0]} to {shapes[1]}")
        pruned = [g for g in plan.groups if g.skip is None]
        self._totals = {
            "target": self.config.sparsity,
            "channels": sum(g.channels for g in pruned if g.kind == "channels"),
            "channels_removed": sum(len(g.prune) for g in pruned if g.kind == "channels"),
            "heads_removed": sum(
                len(g.prune) // max(1, g.head_dim) for g in pruned if g.kind == "heads"
            ),
            "params_removed": manifest.removed_parameters(),
            "groups_skipped": sum(1 for g in plan.groups if g.skip),
        }
        self.manifest, self._model = manifest, model
        self.selection = Selection(
            selected=[(g.root, modules[g.root]) for g in pruned if g.prune],
            skipped=[(g.root, g.skip) for g in plan.groups if g.skip] + plan.skipped_modules,
        )

    def finalize(self, model: nn.Module) -> nn.Module:
        """The model is already plain PyTorch (smaller modules); returned as is."""
        self._require_applied()
        return model

    def summary(self) -> TechniqueSummary:
        selection = self._require_applied()
        rows = []
        for rec in self.manifest.layers.values():
            kept = [len(k) if k is not None else "" for k in (rec.kept_out, rec.kept_in)]
            heads = len(rec.kept_heads) if rec.kept_heads is not None else ""
            params = [t for t in rec.tensors.values() if t.kind == "parameter"]
            removed = sum(math.prod(t.original_shape) - math.prod(t.shape) for t in params)
            rows.append([rec.module, rec.type, *kept, heads, removed])
        return TechniqueSummary(
            technique=self.kind,
            columns=["module", "type", "out_kept", "in_kept", "heads_kept", "params_removed"],
            rows=rows,
            totals=dict(self._totals),
            skipped=list(selection.skipped),
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["manifest"] = self.manifest.to_dict() if self.manifest is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        data = state.get("manifest")
        self.manifest = PruningManifest.from_dict(data) if data is not None else None


def _group_records(graph: Any, group: Any) -> list[LayerRecord]:
    """A :class:`LayerRecord` per module (and bare parameter) that ``group`` slices."""
    records, ops = [], {}
    for item in group.items:
        dep, idxs = item.dep, list(item.idxs)
        target = dep.target.module
        role = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        if isinstance(target, nn.Parameter):
            name = graph._param_to_name.get(target)
            if name is None:
                continue
            owner, _, leaf = name.rpartition(".")
            dim = dep.target.pruning_dim % target.dim()
            drop = set(idxs)
            kept = [i for i in range(target.shape[dim]) if i not in drop]
            shape = tuple(len(kept) if d == dim else n for d, n in enumerate(target.shape))
            tensor = TensorRecord("parameter", tuple(target.shape), shape, {dim: kept})
            owner_type = type(graph.model.get_submodule(owner)).__name__
            records.append(LayerRecord(owner, owner_type, tensors={leaf: tensor}))
        elif target in graph._module2name:
            name = graph._module2name[target]
            ops.setdefault(name, (target, []))[1].append(
                (dep.handler, dep.target.pruning_dim, idxs, role)
            )
    for name, (module, module_ops) in ops.items():

        def run(probe: nn.Module, module_ops: list = module_ops) -> None:
            for handler, dim, idxs, _ in module_ops:
                handler.__self__.pruning_dim = dim
                handler(probe, idxs)

        record = record_slicing(module, name, run)
        for handler, dim, idxs, role in module_ops:
            pruner = handler.__self__
            pruner.pruning_dim = dim
            count = (
                pruner.get_out_channels(module) if role == "out" else pruner.get_in_channels(module)
            )
            kept = sorted(set(range(count)) - set(idxs))
            setattr(record, "kept_out" if role == "out" else "kept_in", kept)
        records.append(record)
    return records


def _heads_record(model: nn.Module, spec: AttentionSpec, plan: GroupPlan) -> LayerRecord:
    removed = {i // spec.head_dim for i in plan.prune}
    kept = [h for h in range(spec.num_heads) if h not in removed]
    return LayerRecord(
        module=spec.name,
        type=type(model.get_submodule(spec.name)).__name__,
        attributes=spec.attributes(len(kept)),
        original_attributes=spec.attributes(spec.num_heads),
        kept_heads=kept,
    )


__all__ = [
    "ATTENTION_ADAPTERS",
    "AttentionSpec",
    "GroupPlan",
    "StructuredPlan",
    "StructuredPruning",
    "StructuredPruningConfig",
]
