"""Recipe schema: the shipped recipes, YAML round trips, JSON Schema, and one-line load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimkit.errors import ConfigError
from slimkit.prune import MagnitudePruningConfig
from slimkit.quant import StaticQuantizationConfig
from slimkit.recipe.schema import Recipe, dump_recipe, load_recipe, recipe_json_schema

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "recipes" / "digits_prune.yaml"
BUILTIN = ROOT / "src" / "slimkit" / "recipe" / "builtin" / "digits_prune.yaml"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_and_builtin_recipes_are_identical_and_load() -> None:
    assert SHIPPED.read_bytes() == BUILTIN.read_bytes()
    recipe = load_recipe(SHIPPED)
    assert recipe == load_recipe(BUILTIN)
    assert (recipe.version, recipe.name, recipe.task) == (1, "digits_prune", "digits")
    [stage] = recipe.stages
    [technique] = stage.techniques
    assert isinstance(technique, MagnitudePruningConfig)
    assert technique.ranking == "global"
    assert technique.schedule is not None
    assert technique.schedule.final_value == 0.8
    assert technique.schedule.last_update_step == 120


def test_the_demo_recipe_prunes_then_quantizes_to_int8() -> None:
    shipped = ROOT / "recipes" / "digits_prune_int8.yaml"
    builtin = BUILTIN.with_name("digits_prune_int8.yaml")
    assert shipped.read_bytes() == builtin.read_bytes()
    recipe = load_recipe(shipped)
    prune, int8 = recipe.stages
    # the prune stage is the plain pruning recipe's, name aside
    assert prune == load_recipe(SHIPPED).stages[0]
    [quant] = int8.techniques
    assert isinstance(quant, StaticQuantizationConfig)
    assert (quant.bits, quant.per_channel, quant.reduce_range) == (8, True, False)
    assert int8.train.epochs == 0 and int8.calibration_batches == 16
    assert recipe.export.onnx and recipe.export.latency and recipe.export.onnx_metric


def test_dump_then_load_gives_an_equal_recipe(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(
        {
            "name": "rich",
            "seed": 3,
            "baseline": {"epochs": 0, "checkpoint": "base.safetensors"},
            "stages": [
                {"name": "one", "techniques": [{"kind": "magnitude_prune", "sparsity": 0.3}]},
                {
                    "name": "two",
                    "train": {"epochs": 2, "optimizer": "sgd", "lr": 0.01},
                    "techniques": [
                        {
                            "kind": "magnitude_prune",
                            "pattern": {"kind": "nm", "n": 2, "m": 4},
                            "scope": {"include": ["type:Linear"], "policy": "latency_1x1"},
                        }
                    ],
                },
            ],
            "export": {"onnx": False, "values_dtype": "float32"},
        }
    )
    for original in (recipe, load_recipe(SHIPPED)):
        text = dump_recipe(original)
        assert load_recipe(write(tmp_path, text)) == original
        assert dump_recipe(load_recipe(write(tmp_path, text))) == text


def test_json_schema_describes_the_recipe() -> None:
    schema = recipe_json_schema()
    json.dumps(schema)  # serialisable as is
    assert {"version", "stages", "baseline", "export"} <= set(schema["properties"])
    assert schema["required"] == ["stages"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["version"].get("const") == 1
    assert schema["$id"].endswith("/recipe/v1.json")


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: x\nstages:\n  - name: a\n   bad: 1\n")
    message = load_error(path)
    assert message.startswith(f"{path}: invalid YAML at line 5: ")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, 'version: 1\nstages: !!python/object/apply:os.system ["echo hi"]\n')
    assert "invalid YAML at line 2" in load_error(path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "a recipe must be a mapping, got list"),
        ("", "a recipe must be a mapping, got NoneType"),
        ("just text\n", "a recipe must be a mapping, got str"),
    ],
)
def test_non_mapping_yaml_is_rejected(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}: {fragment}"


def test_version_2_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 2\nstages: [{name: a}]\n")
    assert load_error(path) == f"{path}: version: Input should be 1 (got 2)"


def test_duplicate_stage_names_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "stages: [{name: a}, {name: b}, {name: a}]\n")
    assert load_error(path) == f"{path}: stage names must be unique; repeated: a"


def test_bad_stage_name_and_empty_stages(tmp_path: Path) -> None:
    assert "stages.0.name" in load_error(write(tmp_path, "stages: [{name: 'a b'}]\n"))
    assert "stages: List should have at least 1 item" in load_error(write(tmp_path, "stages: []\n"))


def test_missing_file_and_binary_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert load_error(missing) == f"recipe not found: {missing}"
    assert load_error(tmp_path) == f"recipe not found: {tmp_path}"  # a folder is not a recipe
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert load_error(binary) == f"{binary}: not a UTF-8 text file"
