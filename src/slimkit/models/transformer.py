"""Small reference transformers: a ViT for 8x8 digits and a tiny random-weight BERT classifier.

The ViT's attention uses separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear layers and
reads ``num_heads``/``head_dim`` at run time, so heads can be pruned by slicing those layers and
updating the two attributes. Plain ``torch.nn`` only (``transformers`` is imported lazily by
:func:`bert_tiny_encoder`), so the models run without slimkit.
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import ConfigError

__all__ = [
    "MLP",
    "Attention",
    "BertClassifier",
    "EncoderBlock",
    "ViT",
    "bert_tiny_encoder",
    "vit_tiny",
]


class Attention(nn.Module):
    """Multi-head self-attention written out with explicit projections.

    ``q_proj``/``k_proj``/``v_proj`` map ``dim -> num_heads * head_dim``; ``out_proj`` maps back.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ConfigError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (self.head_dim**-0.5)
        context = torch.matmul(scores.softmax(dim=-1), v)
        context = context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.out_proj(context)


class MLP(nn.Module):
    """``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: conv ``patch_embed``, ``cls_token``, learned ``pos_embed``,
    ``blocks``, final ``norm`` and a ``head`` on the class token."""

    def __init__(
        self,
        *,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        if dim < 1 or depth < 1 or num_heads < 1:
            raise ConfigError(
                f"dim, depth and num_heads must be positive, got {dim}, {depth}, {num_heads}"
            )
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        mlp_hidden = max(1, int(dim * mlp_ratio))
        self.blocks = nn.Sequential(
            *(EncoderBlock(dim, num_heads, mlp_hidden) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(
    *,
    width: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    patch_size: int = 2,
    image_size: int = 8,
    in_channels: int = 1,
    num_classes: int = 10,
) -> ViT:
    """A ViT for 8x8 digits; ``width`` is the embedding dim (a multiple of ``num_heads``)."""
    if width < 1 or width % num_heads:
        raise ConfigError(f"width ({width}) must be a positive multiple of num_heads ({num_heads})")
    return ViT(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=num_classes,
        dim=width,
        depth=depth,
        num_heads=num_heads,
    )


class BertClassifier(nn.Module):
    """A BERT-style ``encoder`` plus a Linear ``classifier`` on the CLS (first) token."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_classes: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return logits of shape ``(batch, num_classes)``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return self.classifier(self.dropout(hidden[:, 0]))


def bert_tiny_encoder(
    *,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position: int = 128,
    num_classes: int = 2,
    dropout: float = 0.1,
) -> BertClassifier:
    """A random-weight ``transformers`` BERT encoder (eager attention, ONNX-exportable)."""
    encoder = random_bert(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position=max_position,
        dropout=dropout,
        caller="bert_tiny_encoder",
    )
    return BertClassifier(encoder, hidden_size, num_classes, dropout)


def random_bert(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position: int,
    dropout: float = 0.1,
    caller: str = "random_bert",
) -> nn.Module:
    """A random-weight ``transformers.BertModel`` without pooler, eager attention (exports to
    ONNX); ``ConfigError`` when ``transformers`` is missing or the sizes do not fit."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise ConfigError(
            f"{caller} needs the 'transformers' package; install it with `pip install transformers`"
        ) from exc
    if hidden_size % num_heads:
        raise ConfigError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
        )
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False)
