"""``slimkit inspect``: what each technique of a recipe will touch, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from torch import nn

from slimkit.core.scope import module_type_name
from slimkit.core.technique import make_technique
from slimkit.prune.groups import split_inputs, trace_groups
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig
from slimkit.recipe.schema import Recipe
from slimkit.tasks.base import load_task


@dataclass
class InspectRow:
    stage: str
    technique: str
    module: str
    module_type: str
    action: str
    reason: str = ""
    detail: str = ""  # structured pruning: width before -> after, and the coupled layers


@dataclass
class InspectReport:
    """Rows of (stage, technique, module, touched/skipped, reason); renders as a rich table."""

    recipe: str
    rows: list[InspectRow] = field(default_factory=list)

    def touched(self, stage: str | None = None) -> list[str]:
        return [r.module for r in self.rows if r.action == "touch" and stage in (None, r.stage)]

    def skipped(self) -> dict[str, str]:
        return {r.module: r.reason for r in self.rows if r.action == "skip"}

    def __rich__(self) -> Table:
        table = Table(title=f"{self.recipe}: what each technique will touch", title_justify="left")
        details = any(r.detail for r in self.rows)
        columns = ("stage", "technique", "module", "type", "action", "reason")
        for column in (*columns, "groups: width and coupled layers")[: 6 + details]:
            table.add_column(column)
        for r in self.rows:
            style = "dim" if r.action == "skip" else ""
            cells = (r.stage, r.technique, r.module, r.module_type, r.action, r.reason, r.detail)
            table.add_row(*cells[: 6 + details], style=style)
        return table


def inspect_recipe(recipe: Recipe) -> InspectReport:
    """Plan every technique on a freshly built task model; nothing is trained or changed."""
    task = load_task(recipe.task, seed=recipe.seed, batch_size=recipe.batch_size)
    model = task.make_model()
    types = {name: module_type_name(m) for name, m in model.named_modules()}
    report = InspectReport(recipe=recipe.name)
    for stage in recipe.stages:
        for config in stage.techniques:
            technique = make_technique(config)
            technique.example_inputs = task.example_inputs
            if isinstance(config, StructuredPruningConfig):
                report.rows.extend(_structured_rows(stage.name, technique, model, types))
                continue
            selection = technique.plan(model)
            for name, module in selection.selected:
                report.rows.append(
                    InspectRow(stage.name, technique.kind, name, module_type_name(module), "touch")
                )
            for name, reason in selection.skipped:
                report.rows.append(
                    InspectRow(
                        stage.name, technique.kind, name, types.get(name, "?"), "skip", reason
                    )
                )
    return report


def _structured_rows(
    stage: str, technique: StructuredPruning, model: nn.Module, types: dict[str, str]
) -> list[InspectRow]:
    """One row per dependency group: its width now and after pruning (sensitivity allocation
    without a ``sensitivity_file`` decides at run time), and every coupled layer."""
    config = technique.config
    if config.allocation == "sensitivity" and config.sensitivity_file is None:
        args, kwargs = split_inputs(technique.example_inputs)
        plan = trace_groups(model, args, kwargs, config).plan
        after = None
    else:
        plan = technique.plan_groups(model)
        after = True
    rows = []
    for group in plan.groups:
        unit = group.kind
        if group.skip:
            rows.append(
                InspectRow(
                    stage,
                    technique.kind,
                    group.root,
                    types.get(group.root, "?"),
                    "skip",
                    group.skip,
                )
            )
            continue
        width = f"{group.units} {unit}"
        if after is not None:
            lost = len(group.prune)
            width += f" -> {group.units - lost}"
        else:
            width += " -> by sensitivity"
        coupled = ", ".join(m for m in group.members if not m.startswith(f"{group.root}:"))
        rows.append(
            InspectRow(
                stage,
                technique.kind,
                group.root,
                types.get(group.root, "?"),
                "touch",
                detail=f"{width}; coupled: {coupled}" if coupled else width,
            )
        )
    for name, reason in plan.skipped_modules:
        rows.append(InspectRow(stage, technique.kind, name, types.get(name, "?"), "skip", reason))
    return rows
