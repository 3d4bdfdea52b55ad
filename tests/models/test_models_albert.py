"""models/albert.py: the paper's parameter counts, sharing ties through save/load, the SOP head, and a
saved ALBERT as any transformers user loads it (AutoModelForMaskedLM, the fill-mask pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AlbertForMaskedLM, AutoModelForMaskedLM, BertTokenizerFast, pipeline

from models.albert import (
    BLOCKS,
    SOP_INPUTS,
    albert_config,
    albert_forward,
    albert_layers,
    build_albert_for_pretraining,
    count_parameters,
    load_albert,
)
from models.bert import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ALBERT paper (Lan et al. 2020) Tables 3 and 4, base shape V=30000, H=768, L=12, 12 heads, FF 3072.
PAPER_PARAMETERS = [(128, "all", 12e6), (128, "attention", 64e6), (128, "ffn", 38e6), (128, "none", 89e6),
                    (768, "all", 31e6), (768, "none", 108e6)]
WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(sharing: str, **kw):
    shape = dict(vocab_size=len(SPECIALS) + len(WORDS), embedding_size=16, hidden_size=32, num_layers=3,
                 num_heads=2, intermediate_size=64, max_position_embeddings=64)
    shape.update(kw)
    return albert_config(sharing=sharing, **shape)


@pytest.mark.parametrize(("embedding", "sharing", "paper"), PAPER_PARAMETERS)
def test_parameter_counts_reproduce_the_paper(embedding, sharing, paper):
    # The paper counts the model without its pretraining heads (as BERT-base's 108M): AlbertModel =
    # embeddings + encoder + pooler. Built on the meta device: shapes only, no memory, no init time.
    config = albert_config(30000, embedding, 768, 12, 12, 3072, 512, sharing)
    with torch.device("meta"):
        model = build_albert_for_pretraining(config)
    n = count_parameters(model.albert)
    assert abs(n - paper) / paper < 0.03, f"E={embedding} {sharing}: {n / 1e6:.2f}M vs the paper's {paper / 1e6:.0f}M"


@pytest.mark.parametrize("sharing", ["all", "attention", "ffn", "none"])
def test_sharing_ties_the_blocks_it_names(sharing):
    model = build_albert_for_pretraining(tiny_config(sharing))
    layers = albert_layers(model)
    assert len(layers) == (1 if sharing == "all" else 3)
    shared_modules = {"all": {*BLOCKS["attention"], *BLOCKS["ffn"]}, "attention": set(BLOCKS["attention"]),
                      "ffn": set(BLOCKS["ffn"]), "none": set()}[sharing]
    for block in ("attention", "ffn", "ffn_output", "full_layer_layer_norm"):
        shared = block in shared_modules
        same = all(getattr(layer, block) is getattr(layers[0], block) for layer in layers)
        assert same == shared, (sharing, block)
    # counted once: fewer parameters than unshared by exactly the (L - 1) copies of the shared block
    per_layer = {name: sum(count_parameters(getattr(layers[0], m)) for m in mods) for name, mods in BLOCKS.items()}
    unshared = count_parameters(build_albert_for_pretraining(tiny_config("none")))
    saved = {"all": per_layer["attention"] + per_layer["ffn"], "attention": per_layer["attention"],
             "ffn": per_layer["ffn"], "none": 0}[sharing]
    assert count_parameters(model) == unshared - 2 * saved


def sample_batch(n: int = 4, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), len(SPECIALS) + len(WORDS), (n, seq), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    return dict(zip(SOP_INPUTS, (ids, torch.zeros_like(ids), torch.ones_like(ids), labels,
                                 torch.randint(0, 2, (n,), generator=g)), strict=True))


@pytest.mark.parametrize("sharing", ["attention", "ffn", "all", "none"])
def test_ties_survive_save_pretrained_and_load_albert(sharing, tmp_path: Path):
    torch.manual_seed(0)
    model = build_albert_for_pretraining(tiny_config(sharing)).eval()
    model.save_pretrained(tmp_path)  # plain save_pretrained: the mode goes into config.json
    loaded = load_albert(tmp_path).eval()
    assert loaded.config.lightbert_sharing == sharing
    assert count_parameters(loaded) == count_parameters(model)
    batch = sample_batch()
    with torch.no_grad():
        a, b = albert_forward(model, batch), albert_forward(loaded, batch)
    torch.testing.assert_close(a.mlm_logits, b.mlm_logits)
    torch.testing.assert_close(a.sop_logits, b.sop_logits)

    layers = albert_layers(loaded)
    if len(layers) == 1:
        return
    shared = {"attention": "attention.query", "ffn": "ffn", "none": None}[sharing]
    untied = {"attention": "ffn", "ffn": "attention.query", "none": "ffn"}[sharing]

    def weight(layer, path):
        module = layer
        for part in path.split("."):
            module = getattr(module, part)
        return module.weight

    with torch.no_grad():
        if shared:  # change it in the last layer: every layer sees it
            weight(layers[-1], shared).add_(1.0)
            for layer in layers:
                torch.testing.assert_close(weight(layer, shared), weight(layers[0], shared), rtol=0, atol=0)
            assert not torch.equal(weight(layers[0], shared), weight(albert_layers(model)[0], shared))
        before = weight(layers[0], untied).clone()
        weight(layers[1], untied).add_(1.0)  # an unshared block changes in its own layer only
        assert torch.equal(weight(layers[0], untied), before)


def test_load_albert_refuses_copies_that_differ(tmp_path: Path):
    model = build_albert_for_pretraining(tiny_config("none"))
    model.config.lightbert_sharing = "attention"  # claims sharing its weights do not have
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="differs from layer 0"):
        load_albert(tmp_path)


def repeat_batch(tok, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Sequences that repeat one word, one position masked: the answer is whatever the context says."""
    g = torch.Generator().manual_seed(seed)
    first, seq = tok.convert_tokens_to_ids("w0"), 8
    words = (first + torch.randint(0, len(WORDS), (n, 1), generator=g)).expand(n, seq)
    ids = torch.cat([torch.full((n, 1), tok.cls_token_id), words, torch.full((n, 1), tok.sep_token_id)], 1)
    where = torch.randint(1, seq + 1, (n,), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    rows = torch.arange(n)
    labels[rows, where] = ids[rows, where]
    inputs = ids.clone()
    inputs[rows, where] = tok.mask_token_id
    return dict(zip(SOP_INPUTS, (inputs, torch.zeros_like(ids), torch.ones_like(ids), labels,
                                 torch.zeros(n, dtype=torch.long)), strict=True))


def test_saved_albert_loads_with_auto_model_and_fills_masks(tmp_path: Path):
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"),
                            model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    # attention sharing: the mode whose file must carry the shared block once per layer
    model = build_albert_for_pretraining(tiny_config("attention", vocab_size=len(tok)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(100):
        loss = albert_forward(model, repeat_batch(tok, 64, step)).mlm_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = tmp_path / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for i in range(3):  # the shared attention block is in the file under every layer's name
        assert f"albert.encoder.albert_layer_groups.{i}.albert_layers.0.attention.query.weight" in keys
    mlm, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(mlm, AlbertForMaskedLM)
    assert not info["missing_keys"], info["missing_keys"]
    batch = repeat_batch(tok, 8, seed=999)
    with torch.no_grad():
        ours = albert_forward(model, batch).mlm_logits
        theirs = mlm(input_ids=batch["sop_input_ids"]).logits[batch["sop_labels"] != IGNORE_INDEX]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    for word in ("w6", "w31"):
        answers = fill(f"{word} {word} {word} [MASK] {word} {word}")
        assert answers[0]["token_str"] == word, answers[:3]


def order_batch(n_pairs: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """SOP examples of 'counting' text: A = w_s .. w_s+a-1, B = its continuation; each pair in both
    orders (label 0 in order, 1 swapped), so only the order of the segments tells the label."""
    g = torch.Generator().manual_seed(seed)
    cls, sep, first = 2, 3, len(SPECIALS)
    rows, types, labels = [], [], []
    for _ in range(n_pairs):
        s, la, lb = (int(torch.randint(0, 20, (1,), generator=g)), int(torch.randint(3, 7, (1,), generator=g)),
                     int(torch.randint(3, 7, (1,), generator=g)))
        a = [first + (s + i) % len(WORDS) for i in range(la)]
        b = [first + (s + la + i) % len(WORDS) for i in range(lb)]
        for label, (x, y) in enumerate(((a, b), (b, a))):
            rows.append([cls, *x, sep, *y, sep])
            types.append([0] * (len(x) + 2) + [1] * (len(y) + 1))
            labels.append(label)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    type_ids = torch.tensor([t + [0] * (width - len(t)) for t in types])
    attention = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    return dict(zip(SOP_INPUTS, (ids, type_ids, attention, torch.full_like(ids, IGNORE_INDEX),
                                 torch.tensor(labels)), strict=True))


def test_sop_head_fits_a_small_fixed_batch():
    torch.manual_seed(0)
    model = build_albert_for_pretraining(tiny_config("all", num_layers=2))
    batch = order_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss = albert_forward(model, batch).sop_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (albert_forward(model, batch).sop_logits.argmax(-1) == batch["sentence_order_label"]).float().mean()
    assert accuracy >= 0.97, f"SOP accuracy on the training batch {accuracy:.3f}"
