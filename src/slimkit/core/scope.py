"""Scope: one targeting grammar for which modules a technique touches.

A rule is one of:

* an exact module name: ``"layer1.0.conv1"``
* a glob over names: ``"layer1.*"``, ``"*.conv?"`` (``fnmatch`` syntax; ``*`` crosses dots)
* a regular expression, prefixed ``re:``: ``"re:layer[12]\\..*conv"`` (full match)
* a module type, prefixed ``type:``: ``"type:Conv2d"``, ``"type:torch.nn.Linear"``

A rule that matches no module is an error that lists the closest names. Modules a technique cannot
handle are never dropped silently: an exact-name rule that picks one raises, and a glob that picks
one records it in :attr:`Selection.skipped` with the reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.policy import Policy, make_policy
from slimkit.errors import ScopeError, UnsupportedModuleError

# Modules whose ``weight`` is a Linear/Conv kernel: what weight-level techniques handle.
WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_LAYER_NAMES = "Linear, Conv1d, Conv2d, Conv3d"


def is_weight_layer(module: nn.Module) -> bool:
    """Linear or Conv1d/2d/3d (the ``supports`` test of weight-level techniques)."""
    return isinstance(module, WEIGHT_LAYER_TYPES)


def _rule_kind(rule: str) -> str:
    if rule.startswith("re:"):
        return "regex"
    if rule.startswith("type:"):
        return "type"
    if any(ch in rule for ch in "*?["):
        return "glob"
    return "exact"


def rule_matches(rule: str, name: str, module: nn.Module) -> bool:
    """Whether one targeting rule selects the module called ``name``."""
    kind = _rule_kind(rule)
    if kind == "regex":
        return re.fullmatch(rule[3:], name) is not None
    if kind == "type":
        return _type_matches(rule[5:], type(module))
    if kind == "glob":
        return fnmatch.fnmatchcase(name, rule)
    return name == rule


def _type_matches(wanted: str, cls: type) -> bool:
    """``wanted`` names ``cls`` or a base: ``Conv2d``, ``torch.nn.modules.conv.Conv2d``, or a
    public alias such as ``torch.nn.Conv2d`` (looked up in already imported modules only)."""
    if any(wanted in (k.__name__, f"{k.__module__}.{k.__qualname__}") for k in cls.__mro__):
        return True
    module_name, _, attr = wanted.rpartition(".")
    target = getattr(sys.modules.get(module_name), attr, None) if module_name else None
    return isinstance(target, type) and issubclass(cls, target)


def validate_rule(rule: str) -> str:
    """Reject malformed rules early (empty, bad regex)."""
    if not rule or not rule.strip():
        raise ScopeError("empty targeting rule")
    if rule.startswith("re:"):
        try:
            re.compile(rule[3:])
        except re.error as exc:
            raise ScopeError(f"invalid regex in rule {rule!r}: {exc}") from None
    if rule.startswith("type:") and not rule[5:]:
        raise ScopeError(f"rule {rule!r} names no type")
    return rule


def closest_names(rule: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The module names most similar to ``rule`` (for 'did you mean' messages)."""
    pattern = rule.removeprefix("re:").removeprefix("type:")
    return difflib.get_close_matches(pattern, list(names), n=n, cutoff=0.3)


@dataclass
class Selection:
    """What a scope picked in a model: the modules to handle, and the ones skipped with reasons."""

    selected: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.selected]


class Scope(Config):
    """Which modules a technique touches: include/exclude rules plus an optional policy.

    ``include`` defaults to every module the technique supports. ``policy`` names a registered
    :class:`~slimkit.core.policy.Policy` (``all``, ``latency_1x1``).
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    policy: str = Field("all")

    def model_post_init(self, _context: object) -> None:
        for rule in (*self.include, *self.exclude):
            validate_rule(rule)
        make_policy(self.policy)  # raises ConfigError on an unknown name

    def select(
        self,
        model: nn.Module,
        supports: Callable[[nn.Module], bool],
        *,
        technique: str = "technique",
        describe_supported: str = "",
    ) -> Selection:
        """Pick modules of ``model``; raise :class:`ScopeError` for rules that match nothing."""
        policy: Policy = make_policy(self.policy)
        modules = [(name, mod) for name, mod in model.named_modules() if name]
        names = [name for name, _ in modules]
        for rule in (*self.include, *self.exclude):
            if not any(rule_matches(rule, n, m) for n, m in modules):
                near = closest_names(rule, names)
                hint = f"; closest names: {', '.join(near)}" if near else ""
                raise ScopeError(f"{technique}: rule {rule!r} matches no module{hint}")

        selection = Selection()
        for name, module in modules:
            hits = [r for r in self.include if rule_matches(r, name, module)]
            if not hits:
                continue
            excluded = next((r for r in self.exclude if rule_matches(r, name, module)), None)
            if not supports(module):
                if any(_rule_kind(r) == "exact" for r in hits):
                    raise UnsupportedModuleError(
                        f"{technique}: module {name!r} ({type(module).__name__}) is not supported"
                        + (f"; supported: {describe_supported}" if describe_supported else "")
                    )
                if _owns_matrix_parameter(module) and excluded is None:
                    selection.skipped.append(
                        (name, f"{type(module).__name__} is not supported by {technique}")
                    )
                continue
            if excluded is not None:
                selection.skipped.append((name, f"excluded by rule {excluded!r}"))
                continue
            refusal = policy.refusal(name, module)
            if refusal is not None:
                selection.skipped.append((name, f"policy {policy.name!r}: {refusal}"))
                continue
            selection.selected.append((name, module))

        for rule in self.include:
            if not any(rule_matches(rule, n, m) for n, m in modules if supports(m)):
                raise ScopeError(
                    f"{technique}: rule {rule!r} matches only modules it cannot handle"
                    + (f" (supported: {describe_supported})" if describe_supported else "")
                )
        policy.check(model, selection)
        return selection


def _owns_matrix_parameter(module: nn.Module) -> bool:
    """Modules with a parameter of 2+ dims (Embedding, custom layers) are worth reporting;
    norm layers' 1-D scales are not candidates and would only add noise to the skip list."""
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``model`` by ``module``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def module_type_name(module: nn.Module) -> str:
    """The user-facing class name (``Conv2d``, not ``ParametrizedConv2d``)."""
    cls = type(module)
    if cls.__name__.startswith("Parametrized") and len(cls.__bases__) == 1:
        cls = cls.__bases__[0]
    return cls.__name__
