"""Depth pruning: keep some layers of a stack and drop the rest (``drop_layers``).

A student made by dropping layers starts from the teacher's own weights, as DistilBERT's student
was initialised from every other layer of BERT (Sanh et al. 2019)::

    DropLayers(DropLayersConfig(layers="transformer.encoder.layer", keep=[0, 2, 4]))

``apply`` replaces the ``nn.ModuleList`` at ``layers`` with one holding only the kept layers, in
their order (the kept modules themselves, weights untouched). Hugging Face bookkeeping follows:
every ``config`` on the path from the root to the list whose ``num_hidden_layers`` counted the old
layers gets the new count (and ``layer_types``, where present, keeps the kept layers' entries),
and ``layer_idx`` attributes inside a kept layer are renumbered to its new position. The result is
a plain, smaller model: ``finalize`` has nothing to strip. Fine-tune it afterwards, ideally with
``distill`` from the full model (hint pairs from each kept layer to the teacher layer whose job it
takes over).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Selection, closest_names, set_submodule
from slimkit.core.technique import Technique, TechniqueSummary, register_technique
from slimkit.errors import ScopeError, StateError

__all__ = ["DropLayers", "DropLayersConfig", "drop_layers_"]


class DropLayersConfig(Config):
    """Keep the layers ``keep`` (0-based, increasing) of the ``nn.ModuleList`` named ``layers``
    (a module path such as ``transformer.encoder.layer``) and drop the others."""

    kind: Literal["drop_layers"] = "drop_layers"
    layers: str = Field(..., min_length=1, description="module path of an nn.ModuleList")
    keep: tuple[int, ...] = Field(..., min_length=1, description="indices of the layers to keep")

    @model_validator(mode="after")
    def _check_keep(self) -> DropLayersConfig:
        negative = [i for i in self.keep if i < 0]
        if negative:
            raise ValueError(f"keep: layer indices must be >= 0, got {list(self.keep)}")
        repeated = sorted({i for i in self.keep if self.keep.count(i) > 1})
        if repeated:
            raise ValueError(f"keep: layer {repeated[0]} is listed twice in {list(self.keep)}")
        if list(self.keep) != sorted(self.keep):
            raise ValueError(
                f"keep: list the layers in increasing order (they keep their order), "
                f"got {list(self.keep)}"
            )
        return self


def _module_list(model: nn.Module, path: str, keep: tuple[int, ...]) -> nn.ModuleList:
    """The ``nn.ModuleList`` at ``path``; ScopeError when it is missing, not a list, or shorter
    than ``keep`` needs."""
    modules = dict(model.named_modules())
    if path not in modules:
        near = closest_names(path, [n for n, m in modules.items() if isinstance(m, nn.ModuleList)])
        hint = f"; ModuleLists with close names: {', '.join(near)}" if near else ""
        raise ScopeError(f"drop_layers: the model has no module {path!r}{hint}")
    layers = modules[path]
    if not isinstance(layers, nn.ModuleList):
        raise ScopeError(
            f"drop_layers: {path!r} is a {type(layers).__name__}, expected an nn.ModuleList of "
            "layers"
        )
    too_big = [i for i in keep if i >= len(layers)]
    if too_big:
        raise ScopeError(
            f"drop_layers: keep index {too_big[0]} is out of range: {path!r} has {len(layers)} "
            f"layers (0..{len(layers) - 1})"
        )
    return layers


def _update_configs(model: nn.Module, path: str, before: int, keep: tuple[int, ...]) -> int:
    """Fix ``num_hidden_layers`` / ``layer_types`` of HF configs on the path to the list;
    return how many config objects changed."""
    seen: set[int] = set()
    owners = [model]
    parts = path.split(".")[:-1]
    for i in range(len(parts)):
        owners.append(model.get_submodule(".".join(parts[: i + 1])))
    changed = 0
    for owner in owners:
        config = getattr(owner, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        if getattr(config, "num_hidden_layers", None) != before:
            continue
        config.num_hidden_layers = len(keep)
        types = getattr(config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == before:
            config.layer_types = type(types)(types[i] for i in keep)
        changed += 1
    return changed


def _renumber(layer: nn.Module, old: int, new: int) -> None:
    for module in layer.modules():
        if getattr(module, "layer_idx", None) == old:
            module.layer_idx = new


def drop_layers_(model: nn.Module, layers: str, keep: tuple[int, ...] | list[int]) -> int:
    """Keep only the layers ``keep`` of the ``nn.ModuleList`` at ``layers``, in place; return
    the number of layers it had. (The work of :class:`DropLayers`, without the life cycle.)"""
    keep = DropLayersConfig(layers=layers, keep=tuple(keep)).keep
    old = _module_list(model, layers, keep)
    set_submodule(model, layers, nn.ModuleList([old[i] for i in keep]))
    for new, i in enumerate(keep):
        _renumber(old[i], i, new)
    _update_configs(model, layers, len(old), keep)
    return len(old)


@register_technique
class DropLayers(Technique):
    """See :class:`DropLayersConfig` and the module docstring."""

    kind = "drop_layers"
    config_class = DropLayersConfig
    config: DropLayersConfig

    def __init__(self, config: DropLayersConfig) -> None:
        super().__init__(config)
        self._rows: list[list[Any]] = []
        self._before: int | None = None

    def plan(self, model: nn.Module) -> Selection:
        """The dropped layers are selected (they go); the kept ones are listed as skipped."""
        path, keep = self.config.layers, self.config.keep
        layers = _module_list(model, path, keep)
        selection = Selection()
        for i, layer in enumerate(layers):
            if i in keep:
                selection.skipped.append((f"{path}.{i}", f"kept as layer {keep.index(i)}"))
            else:
                selection.selected.append((f"{path}.{i}", layer))
        return selection

    def apply(self, model: nn.Module) -> None:
        """Replace the layer list with the kept layers (idempotent for the same model)."""
        if self._already_applied(model):
            return
        selection = self.plan(model)
        layers = model.get_submodule(self.config.layers)
        self._rows = [
            [
                f"{self.config.layers}.{i}",
                "keep" if i in self.config.keep else "drop",
                self.config.keep.index(i) if i in self.config.keep else "",
                sum(p.numel() for p in layer.parameters()),
            ]
            for i, layer in enumerate(layers)
        ]
        self._before = drop_layers_(model, self.config.layers, self.config.keep)
        self.selection, self._model = selection, model

    def rebuild(self, model: nn.Module) -> nn.Module:
        """Resume: drop the same layers from a fresh ``model`` (as it entered the stage)."""
        drop_layers_(model, self.config.layers, self.config.keep)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """Nothing to strip: the model is already the plain, shallower one."""
        return model

    def summary(self) -> TechniqueSummary:
        dropped = [row for row in self._rows if row[1] == "drop"]
        return TechniqueSummary(
            technique=self.kind,
            columns=["layer", "action", "new_index", "params"],
            rows=[list(row) for row in self._rows],
            totals={
                "layers_before": self._before,
                "layers_after": len(self.config.keep),
                "params_removed": sum(row[3] for row in dropped),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(layers=self.config.layers, keep=list(self.config.keep))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = (state.get("layers"), tuple(state.get("keep", ())))
        if saved != (self.config.layers, self.config.keep):
            raise StateError(
                f"{self.kind}: saved state keeps {list(saved[1])} of {saved[0]!r}, this "
                f"technique keeps {list(self.config.keep)} of {self.config.layers!r}"
            )
