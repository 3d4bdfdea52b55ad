"""models/losses.py against direct reference computations with the full softmax."""

from __future__ import annotations

import pytest
import torch

from models.losses import LossWeights, combine, cosine_loss, gather_support, mlm_loss, soft_label_loss
from tasks.cache.outputs import soft_targets

V, P, T = 40, 12, 2.0


def reference_terms(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, hs: torch.Tensor, ht: torch.Tensor,
                    mask: torch.Tensor, temperature: float) -> dict[str, float]:
    """The three terms written out with the full softmax, in float64, one position / token at a time."""
    zs, zt, hs, ht = zs.double(), zt.double(), hs.double(), ht.double()
    ce = 0.0
    for s_row, t_row in zip(zs, zt, strict=True):
        p = torch.exp(t_row / temperature) / torch.exp(t_row / temperature).sum()
        q = torch.exp(s_row / temperature) / torch.exp(s_row / temperature).sum()
        ce += float((p * (p.log() - q.log())).sum())
    ce = ce / len(zs) * temperature ** 2
    nll = [-float(torch.log(torch.exp(row[y]) / torch.exp(row).sum())) for row, y in zip(zs, labels, strict=True)
           if y != -100]
    cos = []
    for b in range(hs.shape[0]):
        for t in range(hs.shape[1]):
            if mask[b, t]:
                s, u = hs[b, t], ht[b, t]
                cos.append(1.0 - float(s @ u / (s.norm() * u.norm())))
    return {"ce_loss": ce, "mlm_loss": sum(nll) / len(nll), "cos_loss": sum(cos) / len(cos)}


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(P, V, generator=g) * 3, torch.randn(P, V, generator=g) * 3
    labels = torch.randint(0, V, (P,), generator=g)
    labels[[2, 7]] = -100  # positions with soft labels but no MLM label (cache.positions=all)
    hs, ht = torch.randn(3, 6, 16, generator=g), torch.randn(3, 6, 16, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    return zs, zt, labels, hs, ht, mask


def test_three_terms_equal_the_full_softmax_reference_when_k_covers_the_vocabulary(example):
    zs, zt, labels, hs, ht, mask = example
    # the cache's view of the teacher: top-k (k = V) of the T=1 softmax, most likely first
    top = zt.softmax(-1).topk(V, dim=-1)
    ce = soft_label_loss(gather_support(zs, top.indices), soft_targets(top.values, T), T)
    terms = {"ce_loss": ce, "mlm_loss": mlm_loss(zs, labels), "cos_loss": cosine_loss([hs], [ht], mask)}
    ref = reference_terms(zs, zt, labels, hs, ht, mask, T)
    for name, value in terms.items():
        assert value.item() == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name
    # the online teacher's view (its full softmax at T, the vocabulary in order) gives the same
    online = soft_label_loss(zs, torch.softmax(zt / T, -1), T)
    assert online.item() == pytest.approx(ref["ce_loss"], rel=1e-5)
    w = LossWeights()
    total = combine(terms, w).item()
    assert total == pytest.approx(5.0 * ref["ce_loss"] + 2.0 * ref["mlm_loss"] + 1.0 * ref["cos_loss"], rel=1e-5)


def test_top_k_loss_normalises_teacher_and_student_over_the_same_support(example):
    zs, zt, *_ = example
    k = 5
    top = zt.softmax(-1).topk(k, dim=-1)
    zs = zs.clone().requires_grad_(True)
    loss = soft_label_loss(gather_support(zs, top.indices), soft_targets(top.values, T), T)
    # reference: both softmaxes at T restricted to the k ids and renormalised there
    ref = 0.0
    for i in range(P):
        ids = top.indices[i]
        p = torch.softmax(zt[i, ids].double() / T, -1)
        q = torch.softmax(zs[i, ids].detach().double() / T, -1)
        ref += float((p * (p.log() - q.log())).sum())
    assert loss.item() == pytest.approx(ref / P * T ** 2, rel=1e-5)
    # the student's logits outside the support do not enter the loss
    loss.backward()
    outside = torch.ones_like(zs, dtype=torch.bool)
    outside.scatter_(1, top.indices, False)
    assert zs.grad[outside].abs().max() == 0 and zs.grad[~outside].abs().max() > 0


def test_student_equal_to_teacher_has_zero_soft_and_cosine_loss(example):
    _, zt, _, _, ht, mask = example
    ce = soft_label_loss(zt, torch.softmax(zt / T, -1), T)
    assert abs(ce.item()) < 1e-5
    assert abs(cosine_loss([ht * 3.0], [ht], mask).item()) < 1e-6  # cosine ignores the scale


def test_several_layer_pairs_average_and_empty_batches_give_zero(example):
    _, _, _, hs, ht, mask = example
    two = cosine_loss([hs, ht], [ht, ht], mask)
    assert two.item() == pytest.approx(cosine_loss([hs], [ht], mask).item() / 2, rel=1e-6)
    # (P, H) rows of the compared tokens (the teacher cache's form) give the same loss as the mask
    assert cosine_loss([hs[mask.bool()]], [ht[mask.bool()]]).item() == pytest.approx(
        cosine_loss([hs], [ht], mask).item(), rel=1e-6)
    empty = torch.zeros(0, V, requires_grad=True)
    assert soft_label_loss(empty, torch.zeros(0, V), T).item() == 0.0
    assert mlm_loss(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0
