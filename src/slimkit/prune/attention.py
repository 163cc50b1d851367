"""Recognising multi-head attention, so structured pruning removes whole heads.

An adapter maps ``(name, module, model)`` to an :class:`AttentionSpec` (the q/k/v projections,
the output projection, the head count and size, and the attributes to set for a new head count)
or None. Append your own to :data:`ATTENTION_ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttentionSpec:
    """One multi-head attention: its q/k/v projections (outputs = heads * head_dim), the output
    projection, and the attributes to set for a new head count."""

    name: str
    projections: tuple[str, str, str]
    output: str
    num_heads: int
    head_dim: int
    attributes: Callable[[int], dict[str, int]]


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _explicit_attention(name: str, module: nn.Module, model: nn.Module) -> AttentionSpec | None:
    """``q_proj``/``k_proj``/``v_proj``/``out_proj`` with ``num_heads``/``head_dim``
    (slimkit's ViT, timm-like code)."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return None
    if not isinstance(heads, int) or not isinstance(dim, int):
        return None
    q, k, v, o = (_join(name, n) for n in names)
    return AttentionSpec(name, (q, k, v), o, heads, dim, lambda h: {"num_heads": h})


def _hf_self_attention(name: str, module: nn.Module, model: nn.Module) -> AttentionSpec | None:
    """Hugging Face BERT-style ``query``/``key``/``value`` with the output projection at the
    parent's ``output.dense``."""
    heads, dim = (
        getattr(module, "num_attention_heads", None),
        getattr(module, "attention_head_size", None),
    )
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")):
        return None
    if not isinstance(heads, int) or not isinstance(dim, int):
        return None
    parent_name = name.rpartition(".")[0]
    out = getattr(getattr(model.get_submodule(parent_name), "output", None), "dense", None)
    if not isinstance(out, nn.Linear):
        return None
    total = hasattr(module, "all_head_size")

    def attributes(h: int) -> dict[str, int]:
        return {"num_attention_heads": h, **({"all_head_size": h * dim} if total else {})}

    qkv = tuple(_join(name, n) for n in ("query", "key", "value"))
    return AttentionSpec(name, qkv, _join(parent_name, "output.dense"), heads, dim, attributes)


ATTENTION_ADAPTERS: list[Callable[[str, nn.Module, nn.Module], AttentionSpec | None]] = [
    _explicit_attention,
    _hf_self_attention,
]
"""Recognisers of attention modules, tried in order; append your own."""


__all__ = ["ATTENTION_ADAPTERS", "AttentionSpec"]
