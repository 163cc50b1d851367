"""Dependency groups, their per-channel importance, and how many channels each one loses.

:func:`dependency_graph` traces a model with Torch-Pruning (an optional dependency, imported
on first use); :func:`channel_group` turns one of its groups into slimkit's plain view. A group
is every tensor slice that must go together when one channel is removed (a conv's filter, the
next conv's input slice, the BatchNorm entries, a residual partner's filter...). A
:class:`ChannelImportance` maps a group to one score per channel (higher = keep); it accepts a
Torch-Pruning ``Group`` too, so it also plugs into ``torch_pruning`` pruners. Registered criteria:

* ``l1`` / ``l2``: norms of the filters whose outputs the group removes (every coupled conv /
  linear / embedding output slice, summed per channel).
* ``bn_scale``: ``|gamma|`` of the group's BatchNorms (network slimming); falls back to ``l1``
  when the group has no BatchNorm, and says so in :meth:`ChannelImportance.fallback_reason`.
* ``taylor``: first-order Taylor ``|w * dL/dw|`` summed per filter; needs ``.grad`` on the
  weights (e.g. from :func:`accumulate_gradients`), else :class:`StateError`.
* ``random``: a seeded control; the same seed and group give the same scores.

The allocation functions at the end turn scores into counts: :func:`kept_count` (uniform),
:func:`global_prune_counts` (one ranking with a per-group cap), :func:`heads_to_remove`, all
rounded by :func:`round_kept`.
"""

from __future__ import annotations

import abc
import math
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from slimkit.errors import ConfigError, StateError, UnsupportedModuleError, first_line

# --- pure score functions -------------------------------------------------------------------------


def filter_norms(weight: torch.Tensor, dim: int = 0, p: int = 1) -> torch.Tensor:
    """Lp norm of every slice of ``weight`` along ``dim`` (p=1: sum of ``|w|``)."""
    w = weight.detach().float().movedim(dim, 0).reshape(weight.shape[dim], -1)
    return torch.linalg.vector_norm(w, ord=p, dim=1)


def taylor_channel_scores(weight: torch.Tensor, grad: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``sum |w * g|`` over every slice of ``weight`` along ``dim``."""
    product = (weight.detach().float() * grad.detach().float()).abs()
    return product.movedim(dim, 0).reshape(weight.shape[dim], -1).sum(1)


def bn_scale_scores(gamma: torch.Tensor) -> torch.Tensor:
    """``|gamma|`` of a BatchNorm."""
    return gamma.detach().float().abs()


# --- the group view -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupMember:
    """One coupled slice: ``role`` "out" removes the member's outputs, "in" its inputs.

    ``idxs`` are channel indices in the member's own space, ``root_idxs`` the matching root
    channels (they differ across concatenations and flattening).
    """

    name: str
    module: Any  # nn.Module, or an nn.Parameter for a bare parameter such as a ViT's pos_embed
    role: Literal["out", "in"]
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """A dependency group: ``channels`` root channels and the members they couple."""

    root: str
    channels: int
    members: tuple[GroupMember, ...]

    def out_weights(self) -> Iterable[tuple[GroupMember, torch.Tensor, int]]:
        """``(member, weight, channel_dim)`` of the filters the group removes."""
        for m in self.members:
            if m.role == "out":
                found = _filter_weight(m.module)
                if found is not None:
                    yield m, found[0], found[1]

    def scatter(self, member: GroupMember, values: torch.Tensor, into: torch.Tensor) -> None:
        """Add ``values[member.idxs]`` into ``into[member.root_idxs]``."""
        idx = torch.tensor(member.idxs, dtype=torch.long)
        root = torch.tensor(member.root_idxs, dtype=torch.long)
        into.index_add_(0, root, values.to(into.device)[idx])


def _filter_weight(module: Any) -> tuple[torch.Tensor, int] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight, 1 if module.transposed else 0
    if isinstance(module, nn.Linear):
        return module.weight, 0
    if isinstance(module, nn.Embedding):
        return module.weight, 1
    return None


def channel_group(group: Any) -> ChannelGroup:
    """The :class:`ChannelGroup` view of a Torch-Pruning group (built with full indices)."""
    if isinstance(group, ChannelGroup):
        return group
    graph = group._DG
    members = []
    for item in group.items:
        dep, idxs, roots = item.dep, item.idxs, item.root_idxs
        target = dep.target.module
        if isinstance(target, nn.Parameter):
            name = graph._param_to_name.get(target)
        else:
            name = graph._module2name.get(target)
        if name is None or roots is None or any(r is None for r in roots):
            continue  # torch-pruning's own ops (element-wise, reshape, ...) hold no weights
        role = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        members.append(GroupMember(name, target, role, tuple(idxs), tuple(roots)))
    root = graph._module2name.get(group[0].dep.target.module, "?")
    return ChannelGroup(root=root, channels=len(group[0].idxs), members=tuple(members))


def torch_pruning() -> Any:
    """The ``torch_pruning`` module (an optional dependency), imported on first use."""
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError(
            "structured_prune needs the 'torch-pruning' package; install it with "
            "`pip install torch-pruning`"
        ) from None
    return torch_pruning


def dependency_graph(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model`` traced on ``model(*args, **kwargs)``
    (training flags restored; a failure is one :class:`UnsupportedModuleError` line)."""
    tp = torch_pruning()
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=args,
                forward_fn=lambda m, _: m(*args, **kwargs),
                verbose=False,
            )
    except Exception as exc:
        raise UnsupportedModuleError(
            f"structured_prune: cannot trace {type(model).__name__}: {first_line(exc)}"
        ) from exc
    finally:
        for module, training in modes.items():
            module.training = training


# --- importance criteria --------------------------------------------------------------------------


class ChannelImportance(abc.ABC):
    """Scores the channels of a group; higher means more important (kept first)."""

    name: ClassVar[str]

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = int(seed)  # only criteria that draw random numbers use it

    def __call__(self, group: Any) -> torch.Tensor | None:
        return self.score(channel_group(group))

    @abc.abstractmethod
    def score(self, group: ChannelGroup) -> torch.Tensor | None:
        """One float per root channel, or None when the group holds nothing to score."""

    def fallback_reason(self, group: Any) -> str | None:
        """Why this criterion scores ``group`` with another one (None when it does not)."""
        return None


CHANNEL_IMPORTANCES: dict[str, type[ChannelImportance]] = {}


def register_channel_importance(cls: type[ChannelImportance]) -> type[ChannelImportance]:
    """Class decorator: register a criterion under its ``name`` (explicit, never by name)."""
    if cls.name in CHANNEL_IMPORTANCES and CHANNEL_IMPORTANCES[cls.name] is not cls:
        raise ConfigError(f"channel importance {cls.name!r} is already registered")
    CHANNEL_IMPORTANCES[cls.name] = cls
    return cls


def make_channel_importance(name: str, *, seed: int = 0) -> ChannelImportance:
    """Build the registered criterion ``name`` (``seed`` is used by ``random``)."""
    if name not in CHANNEL_IMPORTANCES:
        raise ConfigError(
            f"unknown channel importance {name!r}; expected one of: "
            f"{', '.join(sorted(CHANNEL_IMPORTANCES))}"
        )
    return CHANNEL_IMPORTANCES[name](seed=seed)


def _sum_over_filters(
    group: ChannelGroup, per_filter: Callable[[GroupMember, torch.Tensor, int], torch.Tensor]
) -> torch.Tensor | None:
    scores = torch.zeros(group.channels)
    found = False
    for member, weight, dim in group.out_weights():
        group.scatter(member, per_filter(member, weight, dim), scores)
        found = True
    return scores if found else None


@register_channel_importance
class L1Importance(ChannelImportance):
    """Sum of the L1 norms of every filter the group removes."""

    name = "l1"
    p = 1

    def score(self, group: ChannelGroup) -> torch.Tensor | None:
        return _sum_over_filters(group, lambda _m, w, d: filter_norms(w, d, self.p))


@register_channel_importance
class L2Importance(L1Importance):
    """Sum of the L2 norms of every filter the group removes."""

    name = "l2"
    p = 2


def _batchnorms(group: ChannelGroup) -> list[GroupMember]:
    return [
        m
        for m in group.members
        if isinstance(m.module, nn.modules.batchnorm._BatchNorm) and m.module.affine
    ]


@register_channel_importance
class BNScaleImportance(ChannelImportance):
    """Sum of ``|gamma|`` over the group's BatchNorms; ``l1`` where there is none."""

    name = "bn_scale"

    def score(self, group: ChannelGroup) -> torch.Tensor | None:
        norms = _batchnorms(group)
        if not norms:
            return L1Importance().score(group)
        scores = torch.zeros(group.channels)
        for member in norms:
            group.scatter(member, bn_scale_scores(member.module.weight), scores)
        return scores

    def fallback_reason(self, group: Any) -> str | None:
        if _batchnorms(channel_group(group)):
            return None
        return "no BatchNorm in the group: scored with l1"


@register_channel_importance
class TaylorImportance(ChannelImportance):
    """Sum of ``|w * grad|`` over every filter the group removes (gradients must exist)."""

    name = "taylor"

    def score(self, group: ChannelGroup) -> torch.Tensor | None:
        def per_filter(member: GroupMember, weight: torch.Tensor, dim: int) -> torch.Tensor:
            if weight.grad is None:
                raise StateError(
                    f"taylor importance: {member.name}.weight has no gradient; run a few "
                    "forward/backward passes first (see accumulate_gradients) and do not "
                    "zero the gradients before pruning"
                )
            return taylor_channel_scores(weight, weight.grad, dim)

        return _sum_over_filters(group, per_filter)


def _coupled_norms(member: GroupMember, p: int) -> torch.Tensor | None:
    """Per-channel Lp norm of every weight slice ``member`` loses (None: it holds none)."""
    module = member.module
    if member.role == "out":
        found = _filter_weight(module)
        if found is not None:
            return filter_norms(found[0], found[1], p)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            return filter_norms(module.weight.unsqueeze(1), 0, p)
        return None
    if isinstance(module, nn.Linear):
        return filter_norms(module.weight, 1, p)
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return filter_norms(module.weight, 0 if module.transposed else 1, p)
    return None


@register_channel_importance
class GroupL1Importance(ChannelImportance):
    """Sum of the L1 norms of *every* slice the group removes: its filters, the consumers'
    input weights and the BatchNorm scales (Torch-Pruning's group magnitude). Better than
    ``l1`` on conv -> BatchNorm nets, where BatchNorm rescales the filters' outputs."""

    name = "group_l1"
    p = 1

    def score(self, group: ChannelGroup) -> torch.Tensor | None:
        scores = torch.zeros(group.channels)
        found = False
        for member in group.members:
            norms = _coupled_norms(member, self.p)
            if norms is not None:
                group.scatter(member, norms, scores)
                found = True
        return scores if found else None


@register_channel_importance
class GroupL2Importance(GroupL1Importance):
    """``group_l1`` with L2 norms."""

    name = "group_l2"
    p = 2


@register_channel_importance
class RandomImportance(ChannelImportance):
    """Uniform random scores from ``seed`` and the group's root name (a control)."""

    name = "random"

    def score(self, group: ChannelGroup) -> torch.Tensor | None:
        mixed = (self.seed * 1_000_003 + zlib.crc32(group.root.encode())) % (2**63)
        generator = torch.Generator().manual_seed(mixed)
        return torch.rand(group.channels, generator=generator)


# --- allocation: how many and which channels go (pure) --------------------------------------------


def round_kept(kept: int, channels: int, round_to: int) -> int:
    """``kept`` rounded up to a multiple of ``round_to`` (capped at ``channels``), unless the
    group has fewer than ``round_to`` channels."""
    if round_to > 1 and channels >= round_to:
        kept = min(channels, -(-kept // round_to) * round_to)
    return max(1, kept)


def kept_count(channels: int, sparsity: float, round_to: int = 1) -> int:
    """Channels a group keeps at ``sparsity`` (nearest count, at least 1, then rounded)."""
    return round_kept(max(1, math.floor(channels * (1.0 - sparsity) + 0.5)), channels, round_to)


def heads_to_remove(heads: int, sparsity: float) -> int:
    """Whole heads removed at ``sparsity`` (nearest count; at least one head stays)."""
    return min(heads - 1, math.floor(heads * sparsity + 0.5))


def global_prune_counts(
    scores: list[torch.Tensor],
    sparsity: float,
    max_layer_sparsity: float,
    round_to: int = 1,
    *,
    original: list[int] | None = None,
) -> list[int]:
    """Channels to prune per group under one ranking of mean-normalised scores.

    ``original`` are the groups' widths before earlier passes (iterative pruning; default: the
    current widths ``len(scores[i])``): ``sparsity``, the cap and the rounding refer to them, and
    the counts are what to remove from the current widths now.
    """
    if not scores:
        return []
    sizes = [len(s) for s in scores]
    full = list(original) if original is not None else sizes
    done = [f - n for f, n in zip(full, sizes, strict=True)]
    normalised = [s / s.mean() if s.mean() > 0 else torch.ones_like(s) for s in scores]
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    order = torch.argsort(torch.cat(normalised), stable=True).tolist()
    caps = [
        max(0, min(f - 1, math.floor(f * max_layer_sparsity)) - d)
        for f, d in zip(full, done, strict=True)
    ]
    target = math.floor(sum(full) * sparsity + 0.5) - sum(done)
    counts, total = [0] * len(sizes), 0
    for position in order:
        if total >= target:
            break
        g = int(owner[position])
        if counts[g] < caps[g]:
            counts[g] += 1
            total += 1
    return [
        n - min(n, round_kept(n - c, f, round_to))
        for n, f, c in zip(sizes, full, counts, strict=True)
    ]


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ascending by index (ties: lower index first)."""
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> int:
    """Zero the gradients, then run ``loss_fn(model, batch).backward()`` over ``batches`` so that
    ``.grad`` holds their sum (what ``taylor`` reads). Returns the number of batches."""
    model.zero_grad(set_to_none=True)
    count = 0
    for batch in batches:
        loss_fn(model, batch).backward()
        count += 1
    if count == 0:
        raise StateError("accumulate_gradients: got no batches")
    return count


__all__ = [
    "CHANNEL_IMPORTANCES",
    "BNScaleImportance",
    "ChannelGroup",
    "ChannelImportance",
    "GroupMember",
    "L1Importance",
    "L2Importance",
    "RandomImportance",
    "TaylorImportance",
    "accumulate_gradients",
    "bn_scale_scores",
    "channel_group",
    "dependency_graph",
    "filter_norms",
    "global_prune_counts",
    "heads_to_remove",
    "kept_count",
    "lowest",
    "make_channel_importance",
    "register_channel_importance",
    "round_kept",
    "taylor_channel_scores",
    "torch_pruning",
]
