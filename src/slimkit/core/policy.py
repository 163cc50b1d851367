"""Policies: model-level rules about which modules a technique may touch.

A policy answers ``refusal(name, module)`` (``None`` when allowed, else the reason) and
``check(model, selection)``, which raises :class:`UnsupportedModuleError` naming the modules when
the model cannot be handled under the policy. ``allows`` is the boolean view of ``refusal``.
Policies are registered explicitly in :data:`POLICIES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from slimkit.errors import ConfigError, UnsupportedModuleError

if TYPE_CHECKING:  # pragma: no cover
    from slimkit.core.scope import Selection


class Policy:
    """Base policy: allows everything the technique supports."""

    name = "all"

    def refusal(self, name: str, module: nn.Module) -> str | None:
        """``None`` if the policy allows ``module``, else a short reason."""
        return None

    def allows(self, name: str, module: nn.Module) -> bool:
        return self.refusal(name, module) is None

    def check(self, model: nn.Module, selection: Selection) -> None:
        """Raise when the model cannot be handled under this policy (default: never)."""


class AllPolicy(Policy):
    """Every supported module is eligible (the default)."""

    name = "all"


class Latency1x1Policy(Policy):
    """Only 1x1 convolutions (groups=1) and Linear layers: sparse kernels speed these up.

    TF MOT's ``PruneForLatencyOnXNNPack`` idea: sparse inference engines accelerate pointwise
    convolutions and fully connected layers, so pruning anything else costs accuracy for no speed.
    ``check`` refuses a model in which no module qualifies, naming the convolutions it saw.
    """

    name = "latency_1x1"

    def refusal(self, name: str, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.modules.conv._ConvNd):
            if any(k != 1 for k in module.kernel_size):
                return f"kernel {tuple(module.kernel_size)} is not 1x1"
            if module.groups != 1:
                return f"grouped convolution (groups={module.groups})"
            return None
        return f"{type(module).__name__} is neither a 1x1 convolution nor Linear"

    def check(self, model: nn.Module, selection: Selection) -> None:
        if selection.selected:
            return
        refused = ", ".join(f"{n} ({why})" for n, why in selection.skipped[:4]) or "none found"
        raise UnsupportedModuleError(
            f"policy 'latency_1x1' allows no module of {type(model).__name__}: needs 1x1 Conv "
            f"(groups=1) or Linear layers; refused: {refused}"
        )


POLICIES: dict[str, type[Policy]] = {
    AllPolicy.name: AllPolicy,
    Latency1x1Policy.name: Latency1x1Policy,
}


def make_policy(name: str) -> Policy:
    """Instantiate a registered policy; an unknown name lists the valid ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown policy {name!r}; expected one of: {', '.join(sorted(POLICIES))}"
        ) from None
