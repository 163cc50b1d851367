"""The issue's public names and the recipe form of the callbacks (``CompressionCallback(recipe,
stage=...)``), plus one Hugging Face Trainer run of a tiny BERT classifier pruned from a recipe."""

from __future__ import annotations

import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.integrations._common import make_compressor, recipe_stage_techniques
from slimkit.recipe.schema import Recipe

TWO_STAGES = """\
version: 1
name: two
stages:
  - name: prune
    techniques:
      - kind: magnitude_prune
        sparsity: 0.5
  - name: qat
    techniques:
      - kind: qat
"""


def recipe(stages: int = 2) -> Recipe:
    stage_list = [
        {"name": "prune", "techniques": [{"kind": "magnitude_prune", "sparsity": 0.5}]},
        {"name": "qat", "techniques": [{"kind": "qat"}]},
    ]
    return Recipe.from_dict({"name": "two", "stages": stage_list[:stages]})


def test_recipe_stage_by_name_index_and_path(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(TWO_STAGES, encoding="utf-8")
    assert [t.kind for t in recipe_stage_techniques(recipe(), "qat")] == ["qat"]
    assert [t.kind for t in recipe_stage_techniques(recipe(), 0)] == ["magnitude_prune"]
    assert [t.kind for t in recipe_stage_techniques(recipe(), -1)] == ["qat"]
    assert [t.kind for t in recipe_stage_techniques(str(path), "prune")] == ["magnitude_prune"]
    assert [t.kind for t in make_compressor(path, stage="qat").techniques] == ["qat"]
    one = make_compressor(recipe(stages=1))  # one stage: no stage= needed
    assert [t.kind for t in one.techniques] == ["magnitude_prune"]


def test_recipe_stage_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"has 2 stages \(prune, qat\): pass stage="):
        make_compressor(recipe())
    with pytest.raises(ConfigError, match="has no stage 'nope'; its stages: prune, qat"):
        make_compressor(recipe(), stage="nope")
    with pytest.raises(ConfigError, match="stage index 2 is out of range"):
        make_compressor(recipe(), stage=2)
    with pytest.raises(ConfigError, match="recipe not found"):
        make_compressor(tmp_path / "missing.yaml")
    empty = Recipe.from_dict({"stages": [{"name": "fit"}]})
    with pytest.raises(ConfigError, match="stage 'fit' of recipe 'run' has no techniques"):
        make_compressor(empty)
    from slimkit.prune import MagnitudePruningConfig

    with pytest.raises(ConfigError, match="stage= selects a recipe stage"):
        make_compressor(MagnitudePruningConfig(sparsity=0.5), stage="prune")


def test_lightning_names():
    pytest.importorskip("pytorch_lightning")
    from slimkit.integrations import lightning

    assert lightning.CompressionCallback is lightning.SlimkitCallback
    callback = lightning.CompressionCallback(recipe(), stage="prune", submodule="net")
    assert [t.kind for t in callback.compressor.techniques] == ["magnitude_prune"]
    assert callback.state_key == "SlimkitCallback{'name': None}"  # older checkpoints resume


def test_transformers_names():
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from slimkit.integrations import huggingface, transformers

    assert transformers.CompressionCallback is huggingface.SlimkitTrainerCallback
    assert transformers.CompressionTrainer is huggingface.SlimkitTrainer
    assert transformers.forward_batch is huggingface.forward_batch
    callback = transformers.CompressionCallback(recipe(), stage=1)
    assert [t.kind for t in callback.compressor.techniques] == ["qat"]


def test_hf_trainer_prunes_tiny_bert_from_recipe(tmp_path):
    pytest.importorskip("accelerate")
    hf = pytest.importorskip("transformers")
    from slimkit.integrations.transformers import CompressionCallback

    path = tmp_path / "bert.yaml"
    path.write_text(
        """\
version: 1
name: bert
stages:
  - name: prune
    techniques:
      - kind: magnitude_prune
        schedule: {kind: polynomial, final: 0.6, end: 4, frequency: 2}
        scope: {include: ["bert.encoder.*"]}
""",
        encoding="utf-8",
    )
    torch.manual_seed(0)
    config = hf.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = hf.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(1)
    data = [
        {
            "input_ids": torch.randint(0, 50, (8,), generator=generator),
            "labels": torch.tensor(i % 2),
        }
        for i in range(16)
    ]
    callback = CompressionCallback(str(path), finalize_on_train_end=True)
    args = hf.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=2,
        use_cpu=True,
        disable_tqdm=True,
    )
    hf.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.compressor.step_count == 4
    weights = [
        m.weight
        for n, m in model.named_modules()
        if n.startswith("bert.encoder.") and isinstance(m, torch.nn.Linear)
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros / total == pytest.approx(0.6, abs=0.02)
