"""Intermediate-layer distillation (TinyBERT, Jiao et al. 2020; TextBrewer's intermediate matches), in pure
torch: a list of matches, each a (teacher layer, student layer, feature, loss, weight), and their losses.

Layers are numbered as distilbert.layer_map: 1 = the first transformer layer, L = the last; for hidden
states 0 is the embeddings' output (hidden_states[0] of an HF forward with output_hidden_states=True).

Features:
    hidden     the layer's output hidden states at the compared tokens (where the teacher cache keeps them,
               cache.hidden_positions), MSE (TinyBERT's L_hidn) or 1 - cosine (DistilBERT's Lcos). When the
               widths differ the student's side goes through a learned nn.Linear(H_student, H_teacher)
               (TinyBERT's W_h), one per match as TextBrewer's `proj` (TinyBERT's code shares one across
               layers); it trains with the student and is not part of the saved student.
    attention  the layer's attention of every head, MSE (TinyBERT's L_attn), either on the unnormalised
               scores q.k / sqrt(d) (TinyBERT) or on the probabilities softmax(scores) over the real keys.
               Only the pairs (query, key) of two real tokens count: padding is left out of the mean
               (TinyBERT zeroes the masked scores and averages over every entry, padding included).
               Head counts must match. The maps are computed here from the layer's own query and key
               projections applied to the layer's input (hidden_states[l - 1]), so the model keeps its
               sdpa attention (which returns no maps, see STACK.md) and only the matched layers pay for
               the (B, heads, T, T) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.matches import Match, check_matches  # noqa: F401  (re-exported: the stage imports them from here)


def hidden_projections(matches: Sequence[Match], student_width: int, teacher_width: int) -> nn.ModuleDict:
    """One nn.Linear(student_width, teacher_width) per hidden match when the widths differ (none otherwise)."""
    if student_width == teacher_width:
        return nn.ModuleDict()
    return nn.ModuleDict({m.name: nn.Linear(student_width, teacher_width)
                          for m in matches if m.feature == "hidden"})


class StudentWithProjections(nn.Module):
    """A student and the projections its hidden matches learn. The engine trains and checkpoints both; a
    stage saves only `student` (the projections map into the teacher's width, which deployment has no use for)."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict):
        super().__init__()
        self.student = student
        self.projections = projections

    @property
    def config(self):  # the engine reads the student's shape for its FLOPs estimate
        return self.student.config


def attention_scores(hidden: torch.Tensor, query: nn.Linear, key: nn.Linear, num_heads: int) -> torch.Tensor:
    """(B, T, H) input of a layer -> (B, heads, T, T) scores q.k / sqrt(d) of its self-attention, unmasked
    (as the eager attention of BERT and DistilBERT computes them before adding the mask)."""
    b, t, h = hidden.shape
    d = h // num_heads
    q = query(hidden).view(b, t, num_heads, d).transpose(1, 2)
    k = key(hidden).view(b, t, num_heads, d).transpose(1, 2)
    return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)


def bert_attention_scores(backbone: nn.Module, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    """Attention scores of BERT layer `layer` (1-based) of a BertModel from its input, hidden_states[layer - 1]."""
    attn = backbone.encoder.layer[layer - 1].attention.self
    return attention_scores(hidden_states[layer - 1], attn.query, attn.key, backbone.config.num_attention_heads)


@contextmanager
def first_layers(backbone: nn.Module, n: int) -> Iterator[None]:
    """Run a BertModel through its first n layers only (what attention maps of layers <= n need): its
    last_hidden_state is then layer n's output and hidden_states has n + 1 entries. Not thread-safe."""
    layers = backbone.encoder.layer
    backbone.encoder.layer = layers[:n]
    try:
        yield
    finally:
        backbone.encoder.layer = layers


def real_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """(B, heads, T, T) scores -> per example its (heads, n, n) block between its n real tokens."""
    out = []
    for j in range(scores.shape[0]):
        real = attention_mask[j].bool().nonzero().squeeze(1)
        out.append(scores[j].index_select(1, real).index_select(2, real))
    return out


def attention_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, attention_mask: torch.Tensor,
                   target: str = "scores") -> torch.Tensor:
    """Mean over heads and over the (query, key) pairs of two real tokens of the squared difference of the
    scores (target=scores) or of the probabilities softmax over the real keys (target=probs)."""
    if student_scores.shape[1] != teacher_scores.shape[1]:
        raise ValueError(f"the student's attention has {student_scores.shape[1]} heads, the teacher's "
                         f"{teacher_scores.shape[1]}: attention maps are compared head by head")
    real = attention_mask.bool()
    s, t = student_scores.float(), teacher_scores.float()
    if target == "probs":
        keys = real[:, None, None, :]
        s = torch.softmax(s.masked_fill(~keys, float("-inf")), dim=-1)
        t = torch.softmax(t.masked_fill(~keys, float("-inf")), dim=-1)
    elif target != "scores":
        raise ValueError(f"target must be scores or probs (got {target!r})")
    pairs = (real[:, :, None] & real[:, None, :])[:, None].expand_as(s)
    if not pairs.any():
        return s.sum() * 0.0
    return (s - t)[pairs].pow(2).mean()


def hidden_loss(student_rows: torch.Tensor, teacher_rows: torch.Tensor, loss: str = "mse",
                projection: nn.Module | None = None) -> torch.Tensor:
    """(P, H_s) student rows (through `projection` when given) against (P, H_t) teacher rows of the same
    tokens: mean squared error over every element (mse) or mean 1 - cosine over rows (cos)."""
    s = student_rows if projection is None else projection(student_rows)
    s, t = s.float(), teacher_rows.float()
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"student rows of width {s.shape[-1]} against teacher rows of width {t.shape[-1]}: "
                         "a hidden match between different widths needs a projection")
    if s.shape[0] == 0:
        return s.sum() * 0.0
    if loss == "mse":
        return F.mse_loss(s, t)
    if loss == "cos":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"loss must be mse or cos (got {loss!r})")


def intermediate_terms(matches: Sequence[Match], student_hidden: Sequence[torch.Tensor],
                       student_scores: Mapping[int, torch.Tensor], hidden_where: torch.Tensor,
                       teacher_hidden: Mapping[int, torch.Tensor], teacher_scores: Mapping[int, torch.Tensor],
                       attention_mask: torch.Tensor, projections: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{match name: unweighted loss}. student_hidden: the student's (B, T, H) hidden states, 0 = embeddings;
    student_scores / teacher_scores: layer -> (B, heads, T, T) scores; teacher_hidden: layer -> (P, H_t)
    rows at the tokens hidden_where (B, T) marks."""
    terms: dict[str, torch.Tensor] = {}
    for m in matches:
        if m.feature == "hidden":
            terms[m.name] = hidden_loss(student_hidden[m.student_layer][hidden_where], teacher_hidden[m.teacher_layer],
                                        m.loss, projections[m.name] if m.name in projections else None)
        else:
            terms[m.name] = attention_loss(student_scores[m.student_layer], teacher_scores[m.teacher_layer],
                                           attention_mask, m.attention)
    return terms


def weighted_sum(matches: Sequence[Match], terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum(m.weight * terms[m.name] for m in matches)  # type: ignore[return-value]
