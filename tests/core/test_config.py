"""Configs are data: unknown keys rejected, one-line errors naming nested fields, round trips."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field, field_validator

from slimkit.core.config import Config
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError, ScopeError, SlimkitError
from slimkit.prune import MagnitudePruningConfig
from slimkit.recipe.schema import Recipe


def recipe_with_technique(**technique: Any) -> dict[str, Any]:
    return {"stages": [{"name": "s", "techniques": [{"kind": "magnitude_prune", **technique}]}]}


def test_unknown_key_is_rejected_with_the_field_named() -> None:
    with pytest.raises(ConfigError) as info:
        MagnitudePruningConfig(sparsity=0.5, sparsty=0.3)
    assert str(info.value) == (
        "MagnitudePruningConfig: sparsty: unknown field (check the spelling)"
    )
    assert info.value.fields == [("sparsty", "unknown field (check the spelling)")]
    assert isinstance(info.value, SlimkitError) and isinstance(info.value, ValueError)


def test_from_dict_names_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({"stagez": []}, source="my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml: ")
    assert "stagez: unknown field" in message
    assert "stages: Field required" in message


@pytest.mark.parametrize(
    ("technique", "field", "detail"),
    [
        ({"sparsity": 1.5}, "sparsity", "Input should be less than 1 (got 1.5)"),
        ({"sparsity": 0.5, "sparsty": 0.1}, "sparsty", "unknown field"),
        ({"sparsity": 0.5, "scope": {"policy": "fast"}}, "scope", "unknown policy 'fast'"),
        (
            {"schedule": {"kind": "polynomial", "final": 0.5, "begin": 9, "end": 3}},
            "schedule",
            "begin (9) must be <= end (3)",
        ),
        (
            {"schedule": {"kind": "polynomial", "final": 0.5, "end": 10, "frequency": 0}},
            "frequency",
            "greater than or equal to 1 (got 0)",
        ),
    ],
)
def test_nested_errors_are_flattened_into_one_line_with_the_path(
    technique: dict[str, Any], field: str, detail: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(recipe_with_technique(**technique), source="r.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("r.yaml: stages.0.techniques.0")
    assert field in message
    assert detail in message
    [(path, _)] = info.value.fields
    assert path.startswith("stages.0.techniques.0.")


def test_scope_errors_keep_their_class_through_validation() -> None:
    with pytest.raises(ScopeError, match=r"stages\.0\.techniques\.0.*invalid regex"):
        Recipe.from_dict(recipe_with_technique(sparsity=0.5, scope={"include": ["re:("]}))
    with pytest.raises(ScopeError):
        Scope(include=("re:(",))


def test_many_errors_are_summarised() -> None:
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({"stages": [], "a": 1, "b": 2, "c": 3, "seed": -1})
    assert len(info.value.fields) == 5
    assert str(info.value).endswith("; and 2 more")


class Inner(Config):
    x: int = Field(0, ge=0)


class Outer(Config):
    inner: Any = None

    @field_validator("inner", mode="before")
    @classmethod
    def _build(cls, value: Any) -> Inner:
        return Inner(**value)


def test_errors_of_configs_built_inside_validators_keep_their_field_paths() -> None:
    with pytest.raises(ConfigError) as info:
        Outer(inner={"x": -1})
    assert info.value.fields == [("inner.x", "Input should be greater than or equal to 0 (got -1)")]
    assert str(info.value) == (
        "Outer: inner.x: Input should be greater than or equal to 0 (got -1)"
    )


def test_technique_needs_exactly_one_of_sparsity_and_schedule() -> None:
    with pytest.raises(ConfigError, match="give exactly one of 'sparsity' or 'schedule'"):
        MagnitudePruningConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        MagnitudePruningConfig(sparsity=0.5, schedule={"kind": "constant", "target": 0.5})


@pytest.mark.parametrize(
    "config",
    [
        MagnitudePruningConfig(sparsity=0.5),
        MagnitudePruningConfig(
            schedule={"kind": "polynomial", "final": 0.8, "begin": 2, "end": 40, "frequency": 5},
            ranking="global",
            scope={"include": ["layer1.*", "type:Linear"], "exclude": ["fc"]},
        ),
        MagnitudePruningConfig(pattern={"kind": "nm", "n": 2, "m": 4}),
        MagnitudePruningConfig(
            schedule={"kind": "trials", "target": 0.6, "num_trials": 3, "step_interval": 4},
            pattern={"kind": "block", "shape": [2, 4]},
            importance="ema",
        ),
    ],
    ids=["one_shot", "polynomial_global", "nm", "trials_block_ema"],
)
def test_to_dict_from_dict_round_trip(config: MagnitudePruningConfig) -> None:
    data = config.to_dict()
    assert MagnitudePruningConfig.from_dict(data) == config
    assert MagnitudePruningConfig.from_dict(data).to_dict() == data
    assert data["kind"] == "magnitude_prune"
