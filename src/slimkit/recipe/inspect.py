"""``slimkit inspect``: what each technique of a recipe will touch, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

from slimkit.core.scope import module_type_name
from slimkit.core.technique import make_technique
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
        for column in ("stage", "technique", "module", "type", "action", "reason"):
            table.add_column(column)
        for r in self.rows:
            style = "dim" if r.action == "skip" else ""
            table.add_row(
                r.stage, r.technique, r.module, r.module_type, r.action, r.reason, style=style
            )
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
