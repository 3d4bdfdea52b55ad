"""The BERT teacher: a `BertForPreTraining` built from the configured shape, and its pretraining loss
(masked LM + next sentence prediction) with the vocabulary projection computed only where a label is.

HF's heads project every position onto the vocabulary (B x T x V logits) and then ignore the ~85% of
positions whose label is -100. Gathering the hidden states at the labelled positions first and applying
the same head (`model.cls.predictions`) to them gives the same loss at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForPreTraining

IGNORE_INDEX = -100
PRETRAINING_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label")


def bert_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                max_position_embeddings: int, pad_token_id: int = 0, dropout: float = 0.1) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation="sdpa",  # F.scaled_dot_product_attention: fused kernels on a GPU
    )


def build_bert_for_pretraining(config: BertConfig) -> BertForPreTraining:
    """A freshly initialised BERT with MLM and NSP heads (offline: from the config, no download)."""
    return BertForPreTraining(config)


@dataclass
class PretrainingOutput:
    loss: torch.Tensor  # mlm_loss + nsp_loss, as HF's BertForPreTraining
    mlm_loss: torch.Tensor  # mean cross-entropy over the labelled positions
    nsp_loss: torch.Tensor
    mlm_logits: torch.Tensor  # (n_labelled, vocab): only the labelled positions, in row-major order
    mlm_labels: torch.Tensor  # (n_labelled,)
    nsp_logits: torch.Tensor  # (batch, 2)


def pretraining_forward(model: BertForPreTraining, batch: dict[str, torch.Tensor],
                        all_positions: bool = False) -> PretrainingOutput:
    """MLM + NSP loss of a padded batch (PRETRAINING_INPUTS).

    all_positions=False projects only the positions with a label (the fast path used for training);
    True runs HF's own forward, which computes logits at every position (the baseline it must match).
    """
    labels = batch["labels"].long()
    nsp_labels = batch["next_sentence_label"].long()
    if all_positions:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        logits = out.prediction_logits
        where = labels != IGNORE_INDEX
        mlm_logits, mlm_labels, nsp_logits = logits[where], labels[where], out.seq_relationship_logits
    else:
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], return_dict=True)
        where = labels != IGNORE_INDEX
        mlm_logits = model.cls.predictions(out.last_hidden_state[where])
        mlm_labels = labels[where]
        nsp_logits = model.cls.seq_relationship(out.pooler_output)
    mlm_loss = masked_lm_loss(mlm_logits, mlm_labels)
    nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
    return PretrainingOutput(mlm_loss + nsp_loss, mlm_loss, nsp_loss, mlm_logits, mlm_labels, nsp_logits)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32; 0 (still attached to the graph) for a batch with no labels, where
    the mean of nothing would be NaN."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def pretraining_loss(model: BertForPreTraining, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The engine's loss_fn for the teacher: (loss, {term: detached value})."""
    out = pretraining_forward(model, batch)
    return out.loss, {"mlm_loss": out.mlm_loss.detach(), "nsp_loss": out.nsp_loss.detach()}


def full_position_loss(model: BertForPreTraining, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Same loss through HF's every-position head: the baseline for benchmarks."""
    out = pretraining_forward(model, batch, all_positions=True)
    return out.loss, {"mlm_loss": out.mlm_loss.detach(), "nsp_loss": out.nsp_loss.detach()}


# ------------------------------------------------------------------------------------------------
# fitting an MLM head on a pretrained backbone that has none (a BertModel checkpoint)
# ------------------------------------------------------------------------------------------------
class FrozenBackboneHead(nn.Module):
    """A BertForPreTraining whose backbone is frozen and stays in eval mode (no dropout) while the engine
    trains: only BERT's prediction head learns (transform dense + LayerNorm + output bias; the decoder
    is tied to the word embeddings, which stay frozen). The NSP head is left as it is."""

    def __init__(self, model: BertForPreTraining):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.cls.predictions
        for p in (*head.transform.parameters(), head.bias):
            p.requires_grad_(True)

    @property
    def config(self) -> BertConfig:  # the engine reads the shape for its FLOPs estimate
        return self.model.config

    def train(self, mode: bool = True) -> FrozenBackboneHead:
        super().train(mode)
        self.model.bert.eval()
        return self


def mlm_head_fit_loss(fit: FrozenBackboneHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The engine's loss_fn for head fitting: MLM cross-entropy at the labelled positions, with the backbone
    run without gradients (nothing behind the head is trained, so nothing there needs a backward)."""
    labels = batch["labels"].long()
    where = labels != IGNORE_INDEX
    with torch.no_grad():
        hidden = fit.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"], return_dict=True).last_hidden_state[where]
    loss = masked_lm_loss(fit.model.cls.predictions(hidden), labels[where])
    return loss, {"mlm_loss": loss.detach()}
