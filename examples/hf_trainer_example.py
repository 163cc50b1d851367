"""Compress a tiny BERT classifier with the Hugging Face ``Trainer``: gradual magnitude pruning
of the encoder to 50% while distilling from the uncompressed model, driven by
``CompressionTrainer`` (the Trainer that adds the distillation loss) on random token data.

    python examples/hf_trainer_example.py       # about 10 s on one CPU core

Under DDP (CPU, gloo) start it with torchrun::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/hf_trainer_example.py

The Trainer (through ``accelerate``) joins the process group torchrun describes
(``ddp_backend="gloo"``, ``use_cpu=True``) and wraps the model in ``DistributedDataParallel``
inside ``train()``; the callback applied the techniques earlier, when the Trainer was built, so
DDP wraps the compressed model. The masks are decided on rank 0 and broadcast; every rank takes
its share of each global batch of 32 rows (16 with two processes), so the steps and the pruning
schedule are the ones of one process. Only rank 0 writes the compressor state into checkpoints,
and only rank 0 prints.

``--steps N`` shortens the run; ``--out DIR`` saves a checkpoint at the last step in
``DIR/trainer`` and makes every rank write ``DIR/rank{R}.pt`` (the student's ``state_dict``, its
masks included, plus the sparsity and accuracy) so the ranks can be compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from slimkit import distributed
from slimkit.distill import Distillation, DistillationConfig, SoftLabelConfig
from slimkit.integrations.transformers import CompressionTrainer, forward_batch
from slimkit.prune import MagnitudePruningConfig

STEPS = 60
GLOBAL_BATCH = 32  # rows per optimizer step, over every process


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, help="checkpoint and every rank's DIR/rank{R}.pt")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
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
        schedule={"kind": "polynomial", "final": 0.5, "end": args.steps // 2, "frequency": 5},
        scope={"include": ["bert.encoder.*"]},
    )
    kd = Distillation(DistillationConfig(soft_label=SoftLabelConfig(temperature=2.0))).bind(
        teacher, forward_batch
    )
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out / "trainer" if args.out is not None else Path(scratch)
        training = TrainingArguments(
            output_dir=str(out),
            max_steps=args.steps,
            per_device_train_batch_size=GLOBAL_BATCH // world,
            learning_rate=3e-3,
            report_to=[],
            # with --out: one checkpoint at the last step (the callback adds the compressor state)
            save_strategy="steps" if args.out is not None else "no",
            save_steps=args.steps,
            logging_strategy="no",
            use_cpu=True,
            ddp_backend="gloo" if world > 1 else None,  # under torchrun
            ddp_find_unused_parameters=False,  # every parameter takes part in the loss
            disable_tqdm=True,
        )
        trainer = CompressionTrainer(
            model=student, args=training, train_dataset=train, slimkit=[prune, kd]
        )
        trainer.train()
    pruning = trainer.slimkit.compressor.techniques[0]
    sparsity, acc = pruning.overall_sparsity(), accuracy(student, test)
    if args.out is not None:
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        result = {"state": state, "sparsity": sparsity, "accuracy": acc, "world_size": world}
        result["steps"] = trainer.state.global_step
        torch.save(result, args.out / f"rank{distributed.rank()}.pt")
    if distributed.is_main():
        print(f"sparsity={sparsity:.3f}")
        print(f"accuracy={acc:.4f}")
    distributed.shutdown()  # a barrier, then leave the group: no rank tears gloo down early


if __name__ == "__main__":
    main()
