"""models/intermediate.py against independent float64 references: the attention maps recomputed from a
layer's q/k projections equal HF's eager attention, the attention MSE with padding, the hidden MSE through
a projection, and the match checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from models.intermediate import (
    Match,
    attention_loss,
    attention_scores,
    check_matches,
    hidden_loss,
    hidden_projections,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def padded_mask() -> torch.Tensor:
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    return mask


def test_scores_from_the_q_k_projections_are_hf_eager_attention():
    """softmax(our scores + mask) = the attention probabilities HF's eager attention returns, for BERT
    and DistilBERT layers, in float64 (so the sdpa models can keep sdpa)."""
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=32, attn_implementation="eager")).double().eval()
    distil = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, hidden_dim=32,
                                              attn_implementation="eager")).double().eval()
    ids, mask = torch.randint(0, 50, (3, 7)), padded_mask()
    keys = mask.bool()[:, None, None, :]
    with torch.no_grad():
        b = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        d = distil(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        for layer in (1, 2):
            sa = bert.encoder.layer[layer - 1].attention.self
            got = attention_scores(b.hidden_states[layer - 1], sa.query, sa.key, 4)
            want = b.attentions[layer - 1]
            assert got.shape == want.shape == (3, 4, 7, 7)
            torch.testing.assert_close(torch.softmax(got.masked_fill(~keys, -1e9), -1), want, rtol=0, atol=1e-12)
            at = distil.transformer.layer[layer - 1].attention
            got = attention_scores(d.hidden_states[layer - 1], at.q_lin, at.k_lin, 4)
            torch.testing.assert_close(torch.softmax(got.masked_fill(~keys, -1e9), -1), d.attentions[layer - 1],
                                       rtol=0, atol=1e-12)


def reference_attention_mse(s: np.ndarray, t: np.ndarray, mask: np.ndarray, probs: bool) -> float:
    """Loop over every (example, head, real query, real key); softmax over the real keys only."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        real = np.flatnonzero(mask[b])
        for h in range(s.shape[1]):
            a, c = s[b, h][np.ix_(real, real)], t[b, h][np.ix_(real, real)]
            if probs:
                a = np.exp(a - a.max(1, keepdims=True))
                a /= a.sum(1, keepdims=True)
                c = np.exp(c - c.max(1, keepdims=True))
                c /= c.sum(1, keepdims=True)
            total += ((a - c) ** 2).sum()
            n += a.size
    return total / n


@pytest.mark.parametrize("target", ["scores", "probs"])
def test_attention_mse_counts_only_pairs_of_real_tokens(target):
    torch.manual_seed(1)
    mask = padded_mask()
    s, t = torch.randn(3, 2, 7, 7) * 3, torch.randn(3, 2, 7, 7) * 3
    got = attention_loss(s, t, mask, target).item()
    want = reference_attention_mse(s.double().numpy(), t.double().numpy(), mask.numpy(), target == "probs")
    assert got == pytest.approx(want, rel=1e-5)
    # what sits at padded positions changes nothing
    s2 = s.clone()
    s2[0, :, 5:, :] = 1e3
    s2[2, :, :, 2:] = -1e3
    assert attention_loss(s2, t, mask, target).item() == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="heads"):
        attention_loss(s, t[:, :1], mask, target)


def test_hidden_mse_through_a_projection_and_its_gradient():
    torch.manual_seed(2)
    proj = hidden_projections([Match(4, 2, "hidden", "mse")], 8, 12)["hidden_s2_t4_loss"]
    student, teacher = torch.randn(10, 8, requires_grad=True), torch.randn(10, 12)
    got = hidden_loss(student, teacher, "mse", proj)
    w, b = proj.weight.detach().double().numpy(), proj.bias.detach().double().numpy()
    x, y = student.detach().double().numpy(), teacher.double().numpy()
    want = ((x @ w.T + b - y) ** 2).mean()
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    # d/dW mean((xW^T + b - y)^2) = 2/(P*H) (xW^T + b - y)^T x
    grad = 2.0 / y.size * (x @ w.T + b - y).T @ x
    np.testing.assert_allclose(proj.weight.grad.double().numpy(), grad, rtol=1e-5, atol=1e-8)
    cos = hidden_loss(student, teacher, "cos", proj).item()
    p = x @ w.T + b
    want_cos = np.mean(1 - (p * y).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(y, axis=1))
    assert cos == pytest.approx(want_cos, rel=1e-5)
    with pytest.raises(ValueError, match="projection"):
        hidden_loss(student, teacher, "mse")
    assert len(hidden_projections([Match(4, 2)], 12, 12)) == 0  # same width: no projection


def test_match_checks_name_the_fix():
    check_matches([Match(4, 2), Match(2, 1, "attention"), Match(0, 0)], 2, 4, 2, 2)
    for matches, words in (
        ([Match(5, 2)], "teacher_layer must be 0..4"),
        ([Match(4, 3)], "student_layer must be 0..2"),
        ([Match(0, 1, "attention")], "no attention"),
        ([Match(4, 2, "attention", "cos")], "loss: mse"),
        ([Match(4, 2), Match(4, 2, weight=2.0)], "repeats"),
    ):
        with pytest.raises(ValueError, match=words):
            check_matches(matches, 2, 4, 2, 2)
    with pytest.raises(ValueError, match="distilbert.num_heads to 4"):
        check_matches([Match(4, 2, "attention")], 2, 4, 2, 4)
    assert isinstance(hidden_projections([Match(4, 2)], 8, 12)["hidden_s2_t4_loss"], nn.Linear)
