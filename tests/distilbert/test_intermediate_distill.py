"""Intermediate matches and narrower students in tasks/distilbert/: a narrow student learns from hidden-MSE
(through a projection) and attention-MSE matches, a TinyBERT-shaped student trains against a 12 x 768
teacher, the configuration refuses what cannot work, and the stage trains and logs the terms."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig

from models.bert import bert_config, build_bert_for_pretraining
from models.distilbert import build_student, init_student_from_teacher
from models.intermediate import Match, StudentWithProjections, hidden_projections
from models.losses import LossWeights
from tasks.config import ConfigError, load_config
from tasks.distilbert import build as distilbert
from tasks.pipeline import SPECS
from tasks.stage import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, MASK = 60, 4


def online_batch(n: int = 6, t: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, t), generator=g)
    attention = torch.ones(n, t, dtype=torch.long)
    attention[1, 8:] = 0
    attention[3, 5:] = 0
    masked = (torch.rand(n, t, generator=g) < 0.3) & attention.bool()
    masked[:, 1] = True
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    ids = torch.where(masked, torch.full_like(ids, MASK), ids) * attention
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": attention, "labels": labels}


def narrow_run(matches) -> distilbert.StudentRun:
    return distilbert.StudentRun("random", LossWeights(ce=1.0, mlm=1.0, cos=0.0), "last", "online", matches=tuple(matches))


def test_narrow_student_learns_from_hidden_and_attention_matches():
    torch.manual_seed(0)
    teacher = build_bert_for_pretraining(bert_config(VOCAB, 64, 4, 2, 128, 32, dropout=0.0)).eval()
    with torch.no_grad():  # peaked teacher attention: a fresh BERT's is near uniform, as a fresh student's
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(20)
            layer.attention.self.key.weight.mul_(20)
    student = build_student(teacher.config, 2, dropout=0.0, hidden_size=32, num_heads=2, intermediate_size=64)
    matches = [Match(2, 1, "hidden", "mse"), Match(4, 2, "hidden", "cos", 0.5), Match(0, 0, "hidden", "mse"),
               Match(4, 2, "attention", "mse", 0.01), Match(2, 1, "attention", "mse", 1.0, "probs")]
    model = StudentWithProjections(student, hidden_projections(matches, 32, 64))
    assert sorted(model.projections) == sorted(m.name for m in matches if m.feature == "hidden")
    loss_fn = distilbert.make_loss_fn(narrow_run(matches), [(2, 4)], teacher=teacher)
    batch = online_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        loss, terms = loss_fn(model, batch)
        assert set(terms) == {"ce_loss", "mlm_loss", *(m.name for m in matches)}
        opt.zero_grad()
        loss.backward()
        if step == 0:  # the projections and the attention's q/k get gradients from the matches
            for proj in model.projections.values():
                assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
            assert student.distilbert.transformer.layer[0].attention.q_lin.weight.grad.abs().sum() > 0
            first = terms
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    _, last = loss_fn(model, batch)
    for m in matches:  # every matched term went down
        assert last[m.name] < first[m.name], m.name
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is only read


def test_the_attention_term_reads_the_teachers_layer():
    """Matching the student's layer to the teacher's own maps gives 0 only when the maps are equal: a
    student built as a copy of the teacher's first layer has attention loss 0 there and > 0 against layer 2."""
    torch.manual_seed(1)
    teacher = build_bert_for_pretraining(bert_config(VOCAB, 32, 2, 2, 64, 32, dropout=0.0)).eval()
    with torch.no_grad():
        teacher.bert.embeddings.token_type_embeddings.weight.zero_()
    student = build_student(teacher.config, 1, dropout=0.0).eval()
    init_student_from_teacher(teacher, student, [1])
    batch = online_batch(seed=3)
    for layer, zero in ((1, True), (2, False)):
        run = narrow_run([Match(layer, 1, "attention")])
        _, terms = distilbert.make_loss_fn(run, [(1, 2)], teacher=teacher)(StudentWithProjections(
            student, hidden_projections([], 32, 32)), batch)
        assert (terms[f"attention_s1_t{layer}_loss"].item() < 1e-10) == zero, terms


def test_tinybert_shaped_student_of_a_bert_base_shaped_teacher_trains():
    """4 layers x 312, 12 heads, FFN 1200 (TinyBERT-4) from a 12 x 768 teacher (a small vocabulary keeps it
    quick; at BERT's 30,522 tokens the student has 14.4M parameters, TinyBERT's paper says 14.5M)."""
    with torch.device("meta"):
        full = build_student(BertConfig(), 4, hidden_size=312, num_heads=12, intermediate_size=1200)
    assert 14.0e6 < sum(p.numel() for p in full.parameters()) < 14.6e6
    torch.manual_seed(0)
    teacher = build_bert_for_pretraining(BertConfig(vocab_size=VOCAB, max_position_embeddings=32)).eval()
    student = build_student(teacher.config, 4, hidden_size=312, num_heads=12, intermediate_size=1200)
    assert (student.config.n_layers, student.config.dim, student.config.n_heads, student.config.hidden_dim) == (
        4, 312, 12, 1200)
    matches = [Match(3 * i, i, "hidden") for i in range(5)] + [Match(3 * i, i, "attention") for i in range(1, 5)]
    model = StudentWithProjections(student, hidden_projections(matches, 312, 768))
    loss_fn = distilbert.make_loss_fn(narrow_run(matches), [(4, 12)], teacher=teacher)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = online_batch(n=4, t=10)
    before, _ = loss_fn(model, batch)
    for _ in range(2):
        loss, terms = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = loss_fn(model, batch)
    assert len(terms) == 2 + 9 and after.item() < before.item()


# ------------------------------------------------------------------------------------------------
# configuration and the stage (the session's smoke teacher: 2 layers x 64, 2 heads; its cache: last layer)
# ------------------------------------------------------------------------------------------------
NARROW = ["distilbert.hidden_size=32", "distilbert.num_heads=2", "distilbert.intermediate_size=64",
          "distilbert.init=random", "distilbert.alpha_cos=0"]


def config(*overrides: str):
    return load_config("smoke", overrides=["run.progress=false", *overrides])[0]


@pytest.mark.parametrize(("overrides", "words"), [
    (["distilbert.hidden_size=32", "distilbert.num_heads=2"], "distilbert.init: random"),
    (["distilbert.hidden_size=32", "distilbert.num_heads=2", "distilbert.init=random"], "distilbert.alpha_cos: 0"),
    (["distilbert.matches=[{teacher_layer: 1, student_layer: 1}]"], r"cache.hidden_layers: \[1, 2\]"),
    (["distilbert.matches=[{teacher_layer: 3, student_layer: 1}]"], "teacher_layer must be 0..2"),
    (["distilbert.mode=online", "distilbert.num_heads=4", "distilbert.init=random",
      "distilbert.matches=[{teacher_layer: 2, student_layer: 1, feature: attention}]"], "distilbert.num_heads to 2"),
    (["distilbert.matches=[{teacher_layer: 0, student_layer: 0, feature: attention}]"], "no attention"),
])
def test_configuration_refuses_what_cannot_train(overrides, words):
    with pytest.raises(ConfigError, match=words):
        config(*overrides)


def test_stage_trains_a_narrow_student_with_matches_and_the_no_inter_row(smoke_stages, workdir):
    up = {n: smoke_stages["records"][n] for n in SPECS["distilbert"].upstream}
    logged: list[dict] = []
    cfg = config(*NARROW, "distilbert.mode=online", "distilbert.train.max_steps=8", "distilbert.train.log_every=4",
                 "distilbert.ablations=[no_inter, triple]",
                 "distilbert.matches=[{teacher_layer: 2, student_layer: 1}, "
                 "{teacher_layer: 2, student_layer: 1, feature: attention, weight: 0.1}]")
    rec = run_stage(SPECS["distilbert"], cfg, workdir, up, metrics_sink=lambda m, s: logged.append(m))
    counts, details = rec.manifest["counts"], rec.manifest["details"]
    assert counts["train_hidden_s1_t2_loss"] > 0 and counts["train_attention_s1_t2_loss"] > 0
    assert counts["projection_parameters"] == 32 * 64 + 64  # trained, not in the saved student
    assert details["student"]["matches"][1]["feature"] == "attention"
    assert {"hidden_s1_t2", "attention_s1_t2"} <= set(details["losses_used"])
    names = {k for m in logged for k in m}
    assert {"train_hidden_s1_t2_loss", "train_attention_s1_t2_loss", "ablation/no_inter/val_mlm_accuracy"} <= names
    rows = {r["row"]: r for r in details["ablations"]}
    assert rows["no_inter"]["matches"] == [] and "train_hidden_s1_t2_loss" not in rows["no_inter"]
    assert "teacher init needs" in details["ablations_skipped"]["triple"]
    saved = AutoModelForMaskedLM.from_pretrained(rec.dir / "model")
    assert saved.config.dim == 32 and counts["parameters"] == sum(p.numel() for p in saved.parameters())


def test_cached_mode_attention_match_without_maps_in_the_cache_uses_the_teacher_in_the_step(smoke_stages, workdir):
    """The smoke cache holds no attention maps (it was built without attention matches): the stage computes
    them with the teacher in the step, beside the cached soft labels and hidden states, and says so."""
    up = {n: smoke_stages["records"][n] for n in SPECS["distilbert"].upstream}
    assert json.loads((up["cache"].dir / "cache_manifest.json").read_text())["attention"]["layers"] == []
    cfg = config("distilbert.train.max_steps=4",
                 "distilbert.matches=[{teacher_layer: 2, student_layer: 1, feature: attention, weight: 0.1}]")
    rec = run_stage(SPECS["distilbert"], cfg, workdir, up)
    counts, details = rec.manifest["counts"], rec.manifest["details"]
    assert counts["train_attention_s1_t2_loss"] > 0 and counts["train_ce_loss"] > 0
    assert details["attention_from"] == "teacher layers [2] by the teacher in every step (not in the cache)"


def test_attention_matches_choose_the_cache_key_only_where_the_cache_serves_them():
    """cache.attention_layers: auto follows distilbert.matches' attention layers in cached mode only, and a
    cache built without them keeps its key (so earlier caches stay valid)."""
    from tasks.cache.config import cache_key

    match = "distilbert.matches=[{teacher_layer: 2, student_layer: 1, feature: attention}]"
    plain = cache_key(config())
    assert "attention_layers" not in plain["cache"] and "attention_layers" not in plain
    assert cache_key(config(match))["attention_layers"] == [2]
    assert cache_key(config(match, "distilbert.mode=online")) == plain
    assert cache_key(config("cache.attention_layers=[1]"))["cache"]["attention_layers"] == [1]


def test_cached_hidden_match_reads_the_cache(smoke_stages, workdir):
    up = {n: smoke_stages["records"][n] for n in SPECS["distilbert"].upstream}
    cfg = config("distilbert.train.max_steps=4", "distilbert.matches=[{teacher_layer: 2, student_layer: 1, loss: mse}]")
    rec = run_stage(SPECS["distilbert"], cfg, workdir, up)
    counts = rec.manifest["counts"]
    assert counts["train_hidden_s1_t2_loss"] > 0 and counts["train_cos_loss"] > 0
    assert "projection_parameters" in counts and counts["projection_parameters"] == 0  # same width: none
