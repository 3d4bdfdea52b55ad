"""A teacher without an MLM head (a bare BertModel checkpoint, teacher.mlm_head: none) through the
teacher, cache, distilbert and albert stages: hidden states are cached and distilled, Lce is dropped, and
every manifest says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_teacher import save_bert_model, write_pairs, write_tokenizer
from transformers import AutoModelForMaskedLM, AutoTokenizer

from models.distilbert import FRESH_HEAD
from tasks.cache.outputs import CACHE_MANIFEST, CachedPairs, read_cache_manifest
from tasks.pairs.outputs import load_split
from tasks.pipeline import SPECS
from tasks.stage import StageError, StageRecord, run_stage
from tasks.teacher.outputs import load_saved

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = ("train.max_steps=6", "train.batch_size=8", "train.effective_batch_size=8", "train.warmup_steps=1",
         "train.checkpoint_every=0", "train.log_every=2")


def headless_config(make_config, source: Path, *extra: str):
    return make_config(f"teacher.pretrained={source}", "teacher.mlm_head=none", "pairs.max_seq_len=64",
                       "cache.top_k=8", "cache.views=[nsp,sop]", "cache.splits=[train]",
                       "cache.examples_per_shard=128", "cache.batch_tokens=1024",
                       *(f"distilbert.{s}" for s in STEPS), *(f"albert.{s}" for s in STEPS), *extra)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, make_config_module) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("headless")
    tok_rec = write_tokenizer(root / "up" / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_rec.dir))
    up: dict[str, StageRecord] = {"tokenizer": tok_rec, "pairs": write_pairs(root / "up" / "pairs", tok, 240, 40)}
    save_bert_model(root / "encoder-only", tok)
    cfg = headless_config(make_config_module, root / "encoder-only")
    work = root / "work"
    for spec in (SPECS["teacher"], SPECS["cache"]):
        up[spec.name] = run_stage(spec, cfg, work, {n: up[n] for n in spec.upstream})
    torch.set_num_threads(threads)
    return {"up": up, "source": root / "encoder-only", "work": work}


@pytest.fixture(scope="module")
def make_config_module():
    from tasks.config import load_config

    return lambda *o: load_config("smoke", overrides=["run.progress=false", *o])[0]


def test_cache_holds_hidden_states_only(stages):
    rec = stages["up"]["cache"]
    assert rec.manifest["details"]["has_soft_labels"] is False and rec.manifest["details"]["top_k"] == 0
    assert "no MLM head" in rec.manifest["details"]["soft_labels"]
    manifest = read_cache_manifest(rec.dir)
    assert manifest["has_soft_labels"] is False and manifest["totals"]["positions"] == 0
    assert manifest["totals"]["tokens"] > 0
    shard = manifest["splits"]["train"]["nsp"]["shards"][0]["file"]
    f = safe_open(str(rec.dir / shard), framework="numpy")
    assert f.get_tensor("topk_ids").shape == (0, 0) and f.get_tensor("hidden_2").shape[1] == 32
    # the cached last layer is the encoder's own output
    pairs = load_split(stages["up"]["pairs"].dir, "train")
    data = CachedPairs(rec.dir, pairs, "train", "nsp")
    assert not data.has_soft_labels
    encoder = load_saved(stages["up"]["teacher"].dir).load_model()
    row = pairs[5]
    with torch.no_grad():
        want = encoder(input_ids=torch.tensor([row["input_ids"]]), token_type_ids=torch.tensor([row["token_type_ids"]]),
                       attention_mask=torch.tensor([row["attention_mask"]])).last_hidden_state[0].numpy()
    out = data.teacher_outputs(5)
    at = out["teacher_hidden_positions"].astype(np.int64)
    assert at.tolist() == np.flatnonzero(np.asarray(row["labels"]) != -100).tolist()  # the masked positions
    got, want = out["teacher_hidden_2"].astype(np.float32), want[at]
    # int8 with a per-token scale: within half a step, absmax / 254, of each row's largest magnitude
    assert (np.abs(got - want) <= np.abs(want).max(axis=1, keepdims=True) / 254 * 1.01 + 1e-6).all()
    assert (rec.dir / CACHE_MANIFEST).is_file()


def test_distilbert_drops_lce_and_says_so(stages, make_config, tmp_path):
    cfg = headless_config(make_config, stages["source"])
    logged: list[dict] = []
    rec = run_stage(SPECS["distilbert"], cfg, tmp_path / "work", stages["up"],
                    metrics_sink=lambda m, s: logged.append(m))
    details, counts = rec.manifest["details"], rec.manifest["counts"]
    assert details["dropped"] == {"ce": "teacher has no MLM head (teacher.mlm_head: none)"}
    assert details["losses_used"] == ["mlm", "cos"] and details["student"]["alpha_ce"] == 0.0
    assert details["configured_alpha_ce"] == cfg.distilbert.alpha_ce > 0
    assert "no soft labels" in details["teacher_signal"] and "fresh" in details["student_head"]
    assert counts["steps"] == 6 and "train_ce_loss" not in counts and counts["train_cos_loss"] > 0
    assert not any("train_ce_loss" in m for m in logged) and any("train_cos_loss" in m for m in logged)
    assert "quality_ratio" not in counts  # the teacher has no MLM accuracy to compare with
    student = AutoModelForMaskedLM.from_pretrained(rec.dir / "model")
    assert student.vocab_projector.weight.data_ptr() == student.distilbert.embeddings.word_embeddings.weight.data_ptr()
    assert 0.0 <= counts["val_mlm_accuracy"] <= 1.0
    assert set(FRESH_HEAD) <= {n for n, _ in student.named_parameters(remove_duplicate=False)}


def test_distilbert_online_mode_with_a_headless_teacher(stages, make_config, tmp_path):
    cfg = headless_config(make_config, stages["source"], "distilbert.mode=online")
    rec = run_stage(SPECS["distilbert"], cfg, tmp_path / "work", stages["up"])
    assert rec.manifest["details"]["losses_used"] == ["mlm", "cos"]
    assert "hidden states only" in rec.manifest["details"]["teacher_signal"]


def test_distilbert_with_nothing_left_to_train_on_is_a_clear_error(stages, make_config, tmp_path):
    cfg = headless_config(make_config, stages["source"], "distilbert.alpha_mlm=0", "distilbert.alpha_cos=0")
    with pytest.raises(StageError, match="nothing to train on.*teacher.mlm_head: fit"):
        run_stage(SPECS["distilbert"], cfg, tmp_path / "work", stages["up"])


def test_albert_distilled_variant_drops_lce(stages, make_config, tmp_path):
    cfg = headless_config(make_config, stages["source"], "albert.variants=[distilled]")
    rec = run_stage(SPECS["albert"], cfg, tmp_path / "work", stages["up"])
    result = rec.manifest["details"]["distilled"]
    assert result["dropped"] == {"ce": "teacher has no MLM head (teacher.mlm_head: none)"}
    assert result["losses_used"] == ["mlm", "sop", "cos"]
    counts = rec.manifest["counts"]
    assert counts["distilled_steps"] == 6 and "distilled_train_ce_loss" not in counts
    assert rec.manifest["details"]["shape"]["hidden_size"] == 32  # the teacher's shape
