"""The command line: one-line errors with exit code 2, inspect, schema, run-folder safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "recipes" / "digits_prune.yaml"

BAD_FIELD = """\
version: 1
stages:
  - name: prune
    techniques:
      - kind: magnitude_prune
        sparsity: 0.5
        sparsty: 0.3
"""


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("slimkit: error: ")
    return lines[0]


@pytest.fixture
def bad_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_FIELD, encoding="utf-8")
    return path


def test_bad_recipe_field_is_one_line_and_exit_2(
    bad_recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compress", str(bad_recipe)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line_error(err) == (
        f"slimkit: error: {bad_recipe}: stages.0.techniques.0.magnitude_prune.sparsty: "
        "unknown field (check the spelling)"
    )


def test_installed_script_reports_a_bad_field_in_one_line(bad_recipe: Path) -> None:
    script = Path(sys.executable).with_name("slimkit")
    proc = subprocess.run(
        [str(script), "compress", bad_recipe.name],
        cwd=bad_recipe.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = one_line_error(proc.stderr)
    assert "bad.yaml: stages.0.techniques.0" in line and "sparsty" in line


def test_missing_recipe_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["compress", str(missing)]) == 2
    assert one_line_error(capsys.readouterr().err) == f"slimkit: error: recipe not found: {missing}"
    assert main(["inspect", str(missing)]) == 2
    one_line_error(capsys.readouterr().err)


def test_usage_errors_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress"]) == 2
    err = capsys.readouterr().err
    assert "give a recipe file, or --resume RUN_DIR" in err and "Traceback" not in err
    assert main(["compress", "--run-dir"]) == 2
    assert "requires an argument" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "No such command" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "compress" in capsys.readouterr().out


def test_inspect_lists_touched_modules(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[3].strip(): line for line in out.splitlines() if "│" in line}
    assert {"conv1", "layer2.0.downsample.conv", "fc"} <= set(rows)
    assert len(rows) == 10
    assert all("touch" in row and "magnitude_prune" in row for row in rows.values())
    assert "bn1" not in out


def test_inspect_shows_both_stages_of_the_demo_recipe(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(SHIPPED.with_name("digits_prune_int8.yaml"))]) == 0
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if "│" in line]
    by_stage = {}
    for row in rows:
        by_stage.setdefault((row[1].strip(), row[2].strip()), []).append(row[3].strip())
    assert set(by_stage) == {("prune", "magnitude_prune"), ("int8", "static_quant")}
    assert by_stage[("prune", "magnitude_prune")] == by_stage[("int8", "static_quant")]
    assert len(by_stage[("int8", "static_quant")]) == 10


def test_inspect_reports_a_rule_that_matches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "stages:\n  - name: s\n    techniques:\n"
        "      - {kind: magnitude_prune, sparsity: 0.5, scope: {include: [fcc]}}\n"
    )
    assert main(["inspect", str(path)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "rule 'fcc' matches no module; closest names: fc" in line


def test_schema_prints_valid_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"version", "stages"} <= set(schema["properties"])


@pytest.mark.parametrize("command", ["compress", "demo"])
def test_an_existing_run_dir_is_refused_and_left_alone(
    command: str, tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "results.txt").write_text("precious")
    args = [command, str(tiny_recipe)] if command == "compress" else [command]
    assert main([*args, "--run-dir", str(run_dir), "--quiet"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"run folder {run_dir} already exists and is not empty" in line
    assert [p.name for p in run_dir.iterdir()] == ["results.txt"]
    assert (run_dir / "results.txt").read_text() == "precious"


def test_sensitivity_writes_curves_and_plot_then_refuses_a_used_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    recipe = tmp_path / "s.yaml"
    recipe.write_text(
        "name: sens\nbaseline: {epochs: 1}\nstages:\n  - name: s\n    techniques:\n"
        "      - {kind: structured_prune, sparsity: 0.5, importance: l2, round_to: 4}\n"
    )
    out = tmp_path / "curves"
    assert main(["sensitivity", str(recipe), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "layer3.0.conv1" in printed
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["selection"]["importance"] == "l2" and len(report["sparsities"]) == 9
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sensitivity", str(recipe), "--out", str(out), "--quiet"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"run folder {out} already exists and is not empty" in line


def test_inspect_shows_structured_groups_widths_and_coupled_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    path = tmp_path / "r.yaml"
    path.write_text(
        "stages:\n  - name: s\n    techniques:\n"
        "      - {kind: structured_prune, sparsity: 0.5, round_to: 8}\n"
    )
    assert main(["inspect", str(path)]) == 0
    rows = {
        cells[3].strip(): [c.strip() for c in cells]
        for line in capsys.readouterr().out.splitlines()
        if "│" in line and (cells := line.split("│"))[3].strip()
    }
    assert rows["fc"][5] == "skip" and "output layer" in rows["fc"][6]
    conv1 = rows["conv1"]
    assert conv1[5] == "touch"
    assert conv1[7].startswith("16 channels -> 8; coupled: bn1:out")
    assert "layer1.0.conv1:in" in conv1[7]
    assert rows["layer3.0.conv1"][7].startswith("64 channels -> 32")
