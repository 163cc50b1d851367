"""Compress a tiny BERT classifier with the Hugging Face ``Trainer``: gradual magnitude pruning
of the encoder to 50% while distilling from the uncompressed model, driven by
``CompressionTrainer`` (the Trainer that adds the distillation loss) on random token data.

    python examples/hf_trainer_example.py       # about 10 s on one CPU core

Under DDP launch it with ``torchrun --nproc_per_node 2 examples/hf_trainer_example.py``: the
Trainer wraps the model in DDP and the techniques keep their masks identical on every rank.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from slimkit.distill import Distillation, DistillationConfig, SoftLabelConfig
from slimkit.integrations.transformers import CompressionTrainer, forward_batch
from slimkit.prune import MagnitudePruningConfig

STEPS = 60


def dataset(size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token sequences labelled by whether token 7 occurs: learnable, tiny."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (size, 12), generator=generator)
    labels = (ids == 7).any(dim=1).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(size)]


def accuracy(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.stack([d["input_ids"] for d in data])
        labels = torch.stack([d["labels"] for d in data])
        return (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )
    student = BertForSequenceClassification(config)
    teacher = copy.deepcopy(student).eval()  # a trained teacher in practice
    train, test = dataset(512, seed=1), dataset(256, seed=2)
    prune = MagnitudePruningConfig(
        schedule={"kind": "polynomial", "final": 0.5, "end": STEPS // 2, "frequency": 5},
        scope={"include": ["bert.encoder.*"]},
    )
    kd = Distillation(DistillationConfig(soft_label=SoftLabelConfig(temperature=2.0))).bind(
        teacher, forward_batch
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=STEPS,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = CompressionTrainer(
            model=student, args=args, train_dataset=train, slimkit=[prune, kd]
        )
        trainer.train()
    pruning = trainer.slimkit.compressor.techniques[0]
    print(f"sparsity={pruning.overall_sparsity():.3f}")
    print(f"accuracy={accuracy(student, test):.4f}")


if __name__ == "__main__":
    main()
