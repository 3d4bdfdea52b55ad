"""models/albert_init.py: the factorised embeddings against an independent float64 truncated SVD (numpy),
its error at the Eckart-Young bound, the copied layer's tensors, and at E = H the teacher's embedding
output and first layer reproduced exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.albert import albert_config, albert_layers, build_albert_for_pretraining
from models.albert_init import LAYER_MAP, default_init_layer, init_albert_from_teacher
from models.bert import bert_config, build_bert_for_pretraining

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, H, L = 45, 32, 3


def teacher():
    torch.manual_seed(0)
    t = build_bert_for_pretraining(bert_config(V, H, L, 2, 64, 40, dropout=0.0)).eval()
    with torch.no_grad():  # no tensor left at a value a fresh ALBERT would also have (LayerNorm ones, zero biases)
        for p in t.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t


def albert(embedding: int, sharing: str = "all", **kw):
    torch.manual_seed(1)
    config = albert_config(V, embedding, H, 4, 2, 64, 40, sharing, hidden_act="gelu", **kw)
    return build_albert_for_pretraining(config).eval()


def test_factorised_embeddings_are_the_truncated_svd_at_the_eckart_young_bound():
    t, e = teacher(), 8
    a = albert(e)
    info = init_albert_from_teacher(t, a, 2)
    word = a.albert.embeddings.word_embeddings.weight.detach().double().numpy()
    proj = a.albert.encoder.embedding_hidden_mapping_in
    product = word @ proj.weight.detach().double().numpy().T
    w = t.bert.embeddings.word_embeddings.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    reference = (u[:, :e] * s[:e]) @ vt[:e]
    np.testing.assert_allclose(product, reference, rtol=0, atol=1e-5)
    assert np.all(proj.bias.detach().numpy() == 0)
    bound = np.sqrt(np.sum(s[e:] ** 2))
    assert np.linalg.norm(w - product) == pytest.approx(bound, rel=1e-4)
    assert info["svd_frobenius_error"] == pytest.approx(bound, rel=1e-4)
    assert info["svd_relative_error"] == pytest.approx(bound / np.linalg.norm(w), rel=1e-4)
    # positions through the projection: their least-squares projection onto the top-E right singular space
    pos = t.bert.embeddings.position_embeddings.weight.detach().double().numpy()
    got = a.albert.embeddings.position_embeddings.weight.detach().double().numpy() @ proj.weight.detach().double().numpy().T
    np.testing.assert_allclose(got, pos @ vt[:e].T @ vt[:e], rtol=0, atol=1e-5)
    assert "embeddings.LayerNorm" in info["fresh"] and "sop_classifier" in info["fresh"]


@pytest.mark.parametrize("sharing", ["all", "none"])
def test_every_albert_layer_is_the_chosen_teacher_layer(sharing):
    t = teacher()
    a = albert(8, sharing)
    init_albert_from_teacher(t, a, 3)
    source = t.bert.encoder.layer[2]
    layers = albert_layers(a)
    assert len(layers) == (1 if sharing == "all" else 4)
    for layer in layers:
        for ours, theirs in LAYER_MAP.items():
            for kind in ("weight", "bias"):
                assert torch.equal(getattr(layer.get_submodule(ours), kind), getattr(source.get_submodule(theirs), kind))
    assert torch.equal(a.albert.pooler.weight, t.bert.pooler.dense.weight)
    assert torch.equal(a.predictions.bias, t.cls.predictions.bias)
    assert default_init_layer(12) == 6 and default_init_layer(2) == 1 and default_init_layer(3) == 2


def test_at_full_rank_the_albert_embeds_and_applies_the_layer_as_the_teacher():
    t = teacher()
    a = albert(H)
    info = init_albert_from_teacher(t, a, 1)
    assert info["embeddings"] == "copied (E = H)" and info["svd_frobenius_error"] < 1e-4
    ids = torch.randint(0, V, (3, 9))
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = t.bert(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        got = a.albert(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(got.hidden_states[0], want.hidden_states[0], rtol=0, atol=1e-6)
    # the shared layer = teacher layer 1: its first application is the teacher's first layer
    torch.testing.assert_close(got.hidden_states[1][real], want.hidden_states[1][real], rtol=0, atol=1e-5)
    head_in = want.hidden_states[1][real]
    torch.testing.assert_close(a.predictions(head_in), t.cls.predictions(head_in), rtol=0, atol=1e-5)


def test_refuses_an_albert_the_teacher_does_not_fit():
    t = teacher()
    with pytest.raises(ValueError, match="albert.hidden_size"):
        init_albert_from_teacher(t, build_albert_for_pretraining(
            albert_config(V, 8, 16, 2, 2, 64, 40, hidden_act="gelu")), 1)
    with pytest.raises(ValueError, match="hidden_act"):
        init_albert_from_teacher(t, build_albert_for_pretraining(albert_config(V, 8, H, 2, 2, 64, 40)), 1)
    with pytest.raises(ValueError, match="init_layer 4"):
        init_albert_from_teacher(t, albert(8), 4)
