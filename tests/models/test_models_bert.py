"""models/bert.py: the labelled-positions-only loss equals HF's every-position forward."""

from __future__ import annotations

import torch

from models.bert import (
    IGNORE_INDEX,
    bert_config,
    build_bert_for_pretraining,
    pretraining_forward,
    pretraining_loss,
)


def random_batch(vocab: int, batch: int = 4, seq: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    pos = torch.arange(seq)
    attention = (pos[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, vocab, (batch, seq), generator=g) * attention
    token_type = ((pos[None, :] >= (lengths[:, None] // 2)) & attention.bool()).long()
    chosen = (torch.rand(batch, seq, generator=g) < 0.2) & attention.bool()
    chosen[:, 1] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"input_ids": torch.where(chosen, torch.full_like(input_ids, 4), input_ids),
            "token_type_ids": token_type, "attention_mask": attention, "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (batch,), generator=g)}


def test_builds_sdpa_bert_from_shape():
    model = build_bert_for_pretraining(bert_config(vocab_size=123, hidden_size=32, num_layers=3, num_heads=4,
                                                   intermediate_size=64, max_position_embeddings=64))
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vocab_size == 123 and model.config.num_hidden_layers == 3
    # the MLM decoder is tied to the input embeddings, as in BERT
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


def test_labelled_positions_loss_equals_hf_full_forward():
    torch.manual_seed(0)
    model = build_bert_for_pretraining(bert_config(211, 32, 2, 2, 64, 64)).eval()
    batch = random_batch(211)
    with torch.no_grad():
        hf = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                   labels=batch["labels"], next_sentence_label=batch["next_sentence_label"])
        fast = pretraining_forward(model, batch)
        full = pretraining_forward(model, batch, all_positions=True)
    assert torch.allclose(fast.loss, hf.loss, atol=1e-5), (fast.loss, hf.loss)
    assert torch.allclose(full.loss, hf.loss, atol=1e-5)
    assert fast.mlm_logits.shape == (int((batch["labels"] != IGNORE_INDEX).sum()), 211)
    assert torch.allclose(fast.mlm_logits, full.mlm_logits, atol=1e-5)
    assert torch.allclose(fast.nsp_logits, hf.seq_relationship_logits, atol=1e-6)


def test_labelled_positions_gradients_equal_hf():
    torch.manual_seed(1)
    model = build_bert_for_pretraining(bert_config(97, 32, 2, 2, 64, 64)).eval()
    batch = random_batch(97, seed=3)
    loss, terms = pretraining_loss(model, batch)
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
          labels=batch["labels"], next_sentence_label=batch["next_sentence_label"]).loss.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(fast[name], p.grad, atol=1e-5), name
    assert set(terms) == {"mlm_loss", "nsp_loss"}


def test_batch_without_labels_gives_zero_mlm_loss():
    model = build_bert_for_pretraining(bert_config(50, 16, 1, 2, 32, 32)).eval()
    batch = random_batch(50, seq=10)
    batch["labels"][:] = IGNORE_INDEX
    out = pretraining_forward(model, batch)
    assert out.mlm_loss.item() == 0.0 and torch.isfinite(out.loss)
