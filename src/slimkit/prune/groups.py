"""Dependency groups of a traced model and their slicing: the machinery under structured pruning.

:func:`trace_groups` traces a model with Torch-Pruning's dependency graph (see
:mod:`slimkit.prune.channel_importance`) and returns a :class:`GroupTrace`: every group's
:class:`GroupPlan` (or why it is skipped) and the channel scores of the prunable ones.
:meth:`GroupTrace.set_removals` marks the lowest-scored channels (or whole heads) of each group,
:meth:`GroupTrace.records` turns them into manifest records without touching the model, and
:func:`apply_records` slices a model (the traced one, or a deep copy) group by group, rolling a
group back when it breaks the forward pass. :meth:`GroupTrace.cost` measures the MACs and
parameters the marked removals would leave, on a copy. :class:`~slimkit.prune.structured.
StructuredPruning` and :func:`~slimkit.prune.sensitivity.measure_sensitivity` both build on this.

A group is named by its root module; a group's *units* are its channels, or its heads for an
attention group (whole heads go, head dims never shrink).
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Scope
from slimkit.errors import first_line
from slimkit.measure.flops import count_macs, count_params
from slimkit.prune.attention import ATTENTION_ADAPTERS, AttentionSpec
from slimkit.prune.channel_importance import (
    CHANNEL_IMPORTANCES,
    ChannelGroup,
    channel_group,
    dependency_graph,
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
TECHNIQUE = "structured_prune"


class ChannelSelection(Config):
    """Which groups may lose channels and which channels go first: the fields
    :class:`~slimkit.prune.structured.StructuredPruningConfig` shares with the sensitivity
    analysis. Kept counts are rounded up to a multiple of ``round_to`` (1 = off) where the group
    has at least ``round_to`` channels; with ``prune_heads`` attention loses whole heads."""

    scope: Scope = Scope()
    importance: str = "l1"
    round_to: Annotated[int, Field(ge=1)] = 8
    prune_heads: bool = True
    seed: int = 0

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, value: str) -> str:
        if value not in CHANNEL_IMPORTANCES:
            raise ValueError(f"expected one of {', '.join(sorted(CHANNEL_IMPORTANCES))}")
        return value


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

    @property
    def units(self) -> int:
        """Channels, or heads for an attention group."""
        return self.heads if self.kind == "heads" else self.channels


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


def removal_count(
    current: int, original: int, sparsity: float, round_to: int = 1, *, heads: bool = False
) -> int:
    """Units to remove from a group ``current`` units wide so that ``sparsity`` of its
    ``original`` width is gone (kept channels rounded by ``round_to``; never negative)."""
    if heads:
        kept = original - heads_to_remove(original, sparsity)
    else:
        kept = kept_count(original, sparsity, round_to)
    return max(0, current - kept)


# --- forward passes -------------------------------------------------------------------------------


def split_inputs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of example inputs: a tensor, or a tuple whose trailing dict holds
    keyword arguments."""
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if args and isinstance(args[-1], dict):
        return args[:-1], dict(args[-1])
    return args, {}


def leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for item in items for t in leaves(item)]


def forward_eval(
    model: nn.Module, args: tuple, kwargs: dict, hooks: bool = False
) -> tuple[Any, set]:
    """Eval-mode forward (training flags restored); with ``hooks`` also the names of the modules
    whose output tensor is a model output (weak references: no activation is kept alive)."""
    modes = {m: m.training for m in model.modules()}
    produced: list[tuple[str, weakref.ref]] = []

    def hook(module: nn.Module, _args: Any, out: Any, name: str = "") -> None:
        produced.extend((name, weakref.ref(t)) for t in leaves(out))

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
    outputs = leaves(out)
    return out, {name for name, ref in produced if any(ref() is t for t in outputs)}


@dataclass(frozen=True)
class Cost:
    """Per-sample MACs (:func:`~slimkit.measure.flops.count_macs`) and parameter count."""

    macs: int
    params: int

    def value(self, metric: Literal["flops", "params"]) -> int:
        """MACs for ``"flops"`` (FLOPs = 2 MACs: shares are the same), else parameters."""
        return self.macs if metric == "flops" else self.params

    def reduction(self, baseline: Cost, metric: Literal["flops", "params"]) -> float:
        """Share of ``baseline``'s ``metric`` that is gone here."""
        return 1.0 - self.value(metric) / max(1, baseline.value(metric))


class _Bound(nn.Module):
    """``model`` with keyword arguments bound, for :func:`count_macs` (positional only)."""

    def __init__(self, model: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, *args: Any) -> Any:
        return self.model(*args, **self.kwargs)


def measure_cost(model: nn.Module, args: tuple, kwargs: dict) -> Cost:
    """MACs per sample of one eval-mode forward on ``args``/``kwargs``, and the parameters."""
    macs = count_macs(_Bound(model, kwargs) if kwargs else model, args).total_macs
    return Cost(macs=macs, params=count_params(model))


# --- tracing --------------------------------------------------------------------------------------


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


@dataclass
class ScoredGroup:
    """A prunable group: its plan, one score per root channel, and its attention (if any)."""

    plan: GroupPlan
    scores: torch.Tensor
    spec: AttentionSpec | None


@dataclass
class GroupTrace:
    """One traced model: every group's plan and what slicing the prunable ones needs."""

    model: nn.Module
    args: tuple
    kwargs: dict
    plan: StructuredPlan
    graph: Any
    groups: list[ScoredGroup]
    roots: dict[str, tuple[Any, Any]]
    specs: dict[str, AttentionSpec]

    @property
    def prunable(self) -> dict[str, ScoredGroup]:
        """The groups not (yet) skipped, by root name."""
        return {g.plan.root: g for g in self.groups if g.plan.skip is None}

    def set_removals(self, removals: Mapping[str, int]) -> None:
        """Mark the ``removals[root]`` lowest-scored units of each group (others: none)."""
        for g in self.groups:
            count = removals.get(g.plan.root, 0) if g.plan.skip is None else 0
            if g.spec is None:
                g.plan.prune = lowest(g.scores, count)
                continue
            dim = g.spec.head_dim
            heads = lowest(g.scores.reshape(g.spec.num_heads, dim).sum(1), count)
            g.plan.prune = [h * dim + j for h in heads for j in range(dim)]

    def records(self) -> list[tuple[GroupPlan, list[LayerRecord]]]:
        """Records of every marked group, the model untouched; a group that cannot be sliced
        is skipped with its reason."""
        todo = []
        for g in self.plan.groups:
            if g.skip is not None or not g.prune:
                continue
            module, fn = self.roots[g.root]
            try:
                records = group_records(
                    self.graph, self.graph.get_pruning_group(module, fn, g.prune)
                )
            except Exception as exc:
                g.skip, g.prune = f"cannot be sliced: {first_line(exc)}", []
                continue
            if g.attention is not None:
                records.append(heads_record(self.model, self.specs[g.attention], g))
            todo.append((g, records))
        return todo

    def cost(self, removals: Mapping[str, int]) -> Cost:
        """MACs and parameters left after ``removals``, measured on a pruned deep copy."""
        self.set_removals(removals)
        pruned = copy.deepcopy(self.model)
        apply_records(pruned, self.records(), self.args, self.kwargs)
        return measure_cost(pruned, self.args, self.kwargs)


def trace_groups(
    model: nn.Module, args: tuple, kwargs: dict, selection: ChannelSelection
) -> GroupTrace:
    """Trace ``model`` and score the channels of every group the selection allows."""
    chosen = selection.scope.select(
        model,
        lambda m: isinstance(m, SUPPORTED),
        technique=TECHNIQUE,
        describe_supported="Conv1d/2d/3d, Linear, Embedding",
    )
    _, outputs = forward_eval(model, args, kwargs, hooks=True)
    graph = dependency_graph(model, args, kwargs)
    specs: dict[str, AttentionSpec] = {}
    for name, module in model.named_modules():
        spec = next((s for a in ATTENTION_ADAPTERS if (s := a(name, module, model))), None)
        for proj in spec.projections if spec else ():
            specs[proj] = spec
    importance = make_channel_importance(selection.importance, seed=selection.seed)
    plans, roots, scored = [], {}, []
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
        view = channel_group(group)
        members = [f"{m.name}:{m.role}" for m in view.members]
        plan = GroupPlan(view.root, "channels", view.channels, members)
        plans.append(plan)
        roots[plan.root] = (group[0].dep.target.module, group[0].dep.handler)
        plan.skip = _skip_reason(view, set(chosen.names), dict(chosen.skipped), outputs)
        outs = {m.name for m in view.members if m.role == "out"}
        spec = next((specs[n] for n in sorted(outs) if n in specs), None)
        if spec is not None:
            plan.kind, plan.attention = "heads", spec.name
            plan.heads, plan.head_dim = spec.num_heads, spec.head_dim
            ins = {m.name for m in view.members if m.role == "in"}
            if not selection.prune_heads:
                plan.skip = plan.skip or "attention projections: set prune_heads to remove heads"
            elif not (set(spec.projections) <= outs and spec.output in ins) or (
                view.root not in spec.projections or view.channels != spec.num_heads * spec.head_dim
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
        scored.append(ScoredGroup(plan, scores, specs.get(view.root)))
    whole = StructuredPlan(plans, sorted(outputs), list(chosen.skipped))
    attention = {s.name: s for s in specs.values()}
    return GroupTrace(model, args, kwargs, whole, graph, scored, roots, attention)


# --- slicing --------------------------------------------------------------------------------------


def apply_records(
    model: nn.Module, todo: list[tuple[GroupPlan, list[LayerRecord]]], args: tuple, kwargs: dict
) -> PruningManifest:
    """Slice ``model`` (the traced model or a copy: modules are found by name) group by group;
    a group that breaks the forward pass is rolled back and skipped with the reason. Returns the
    manifest of what was applied."""
    modules = dict(model.named_modules())
    manifest = PruningManifest()
    for g, records in todo:
        log = []
        try:
            for record in records:
                log += apply_record(modules[record.module], record)
            forward_eval(model, args, kwargs)
        except Exception as exc:
            undo(log)
            g.skip, g.prune = f"broke the forward pass, rolled back: {first_line(exc)}", []
            continue
        for record in records:
            manifest.add(record)
    return manifest


def group_records(graph: Any, group: Any) -> list[LayerRecord]:
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
                if isinstance(probe, nn.LayerNorm):
                    _slice_layernorm(probe, idxs, dim)
                else:
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


def _slice_layernorm(layer: nn.LayerNorm, idxs: list[int], dim: int) -> None:
    """Remove ``idxs`` along ``dim`` of a LayerNorm, keeping the rest in order. (Torch-Pruning
    1.6's LayerNorm pruner keeps them in set order: ``keep_idxs.sort()`` on a tensor is not in
    place, which permutes channels for some index sets.)"""
    shape = list(layer.normalized_shape)
    keep = torch.tensor(sorted(set(range(shape[dim])) - set(idxs)), dtype=torch.long)
    for name in ("weight", "bias"):
        tensor = getattr(layer, name, None)
        if tensor is not None:
            setattr(layer, name, nn.Parameter(tensor.detach().index_select(dim, keep)))
    shape[dim] = len(keep)
    layer.normalized_shape = tuple(shape)


def heads_record(model: nn.Module, spec: AttentionSpec, plan: GroupPlan) -> LayerRecord:
    """The record of an attention module losing the heads ``plan`` removes."""
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
    "ChannelSelection",
    "Cost",
    "GroupPlan",
    "GroupTrace",
    "ScoredGroup",
    "StructuredPlan",
    "apply_records",
    "forward_eval",
    "group_records",
    "heads_record",
    "leaves",
    "measure_cost",
    "removal_count",
    "split_inputs",
    "trace_groups",
]
