"""What the MiniLM benchmarks share: the bundled encoder and its tokenized sentence batches, the
ONNX export arguments, ORT embeddings and per-batch-size ORT latency."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.measure.latency import compare_latency, ort_session
from slimkit.models.sentence import load_minilm, tokenize_batches
from slimkit.tasks.text import load_reference_sentences

INPUTS = ["input_ids", "attention_mask"]
EXPORT = {
    "input_names": INPUTS,
    "output_names": ["embeddings"],
    "dynamic_axes": {name: {1: "sequence"} for name in INPUTS},
}


@dataclass
class MiniLMData:
    """The sentences, the encoder, its tokenizer, the first ``first`` sentences and the
    ``evaluation`` held-out ones as tokenized batches, and the timed shapes: batch size ->
    sequence length (batch 1 at the median sentence length, batch 32 at the median padded
    batch length)."""

    corpus: Any
    encoder: nn.Module
    tokenizer: Any
    first: list[dict[str, torch.Tensor]]
    evaluation: list[dict[str, torch.Tensor]]
    shapes: dict[int, int]


def load_minilm_data(first: int, evaluation: int, batch_size: int) -> MiniLMData:
    corpus = load_reference_sentences(first, evaluation)
    encoder, tokenizer = load_minilm()
    limit = encoder.max_seq_length
    batches = [
        tokenize_batches(tokenizer, sentences, batch_size=batch_size, max_length=limit)
        for sentences in (corpus.calibration, corpus.evaluation)
    ]
    lengths = [int(n) for b in batches[1] for n in b["attention_mask"].sum(dim=1)]
    padded = [int(b["input_ids"].shape[1]) for b in batches[1]]
    shapes = {1: int(statistics.median(lengths)), 32: int(statistics.median(padded))}
    return MiniLMData(corpus, encoder, tokenizer, batches[0], batches[1], shapes)


def ort_embeddings(path: Path, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    session = ort_session(path, threads=1)
    feeds = [{k: v.numpy() for k, v in batch.items()} for batch in batches]
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def ort_latency(
    paths: dict[str, Path], shapes: dict[int, int], args: Any, threads: int = 1
) -> dict[int, Any]:
    """``compare_latency`` per batch size (its own sequence length), the first path the
    reference; ``args`` gives ``warmup``/``repeats`` (batch 1), ``big_counts`` and ``rounds``."""
    results: dict[int, Any] = {}
    for batch, length in shapes.items():
        warmup, repeats = (args.warmup, args.repeats) if batch == 1 else args.big_counts
        results[batch] = compare_latency(
            paths,
            batch_sizes=(batch,),
            threads=threads,
            rounds=args.rounds,
            warmup=warmup,
            repeats=repeats,
            dim_defaults={"sequence": length},
        )
        print(f"ORT latency batch {batch} x {length} tokens done", flush=True)
    return results
