"""tasks/teacher/ through tasks.stage.run_stage, on hand-made tokenizer and pairs stage outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_pairs_rows
from transformers import AutoTokenizer, BertForPreTraining, BertTokenizerFast

from models.bert import PRETRAINING_INPUTS, bert_config, build_bert_for_pretraining
from tasks.artifacts import hash_tree, sha256_json
from tasks.pairs.outputs import load_split
from tasks.pipeline import SPECS
from tasks.stage import StageRecord, read_manifest, run_stage
from tasks.teacher import build as teacher
from tasks.teacher.outputs import load_saved

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(36)]
# Documents repeat one of these motifs: a masked word follows from its neighbours, and a B' that
# continues A's motif (next_sentence_label 0) differs from a random one (1).
MOTIFS = [WORDS[i:i + 4] for i in range(0, 36, 4)] + [WORDS[i:i + 3] for i in range(1, 36, 6)]


def record(name: str, root: Path) -> StageRecord:
    return StageRecord(name, root, {"output_fingerprint": sha256_json(hash_tree(root))}, cached=False,
                       reason="made by the test")


def write_tokenizer(root: Path) -> StageRecord:
    root.mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(root / "vocab.txt"),
                            model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tok.save_pretrained(root)
    return record("tokenizer", root)


def motif_rows(tok, n: int, seed: int) -> list[dict]:
    """Pairs rows (helpers.write_pairs_rows), 15% of word positions masked BERT-style; half of them with a
    B' from another motif (B, the true continuation, stored after it), none swapped."""
    rng = np.random.default_rng(seed)
    ids = {w: tok.convert_tokens_to_ids(w) for w in WORDS}
    mask = tok.mask_token_id
    rows = []
    for row in range(n):
        m = int(rng.integers(len(MOTIFS)))
        len_a, len_b = int(rng.integers(4, 14)), int(rng.integers(4, 14))
        phase = int(rng.integers(4))
        a = [ids[MOTIFS[m][(phase + i) % len(MOTIFS[m])]] for i in range(len_a)]
        b = [ids[MOTIFS[m][(phase + len_a + i) % len(MOTIFS[m])]] for i in range(len_b)]
        random_b = int(rng.random() < 0.5)
        b_prime = b
        if random_b:
            mb, start = (m + int(rng.integers(1, len(MOTIFS)))) % len(MOTIFS), int(rng.integers(4))
            b_prime = [ids[MOTIFS[mb][(start + i) % len(MOTIFS[mb])]] for i in range(len_b)]
        run = np.array(a + b_prime + (b if random_b else []))
        chosen = np.sort(rng.choice(len_a + len_b, size=max(1, round(0.15 * (len_a + len_b))), replace=False))
        inputs = run.copy()
        inputs[chosen[rng.random(len(chosen)) < 0.8]] = mask
        rows.append({"a": a, "b_prime": b_prime, "b": b if random_b else None, "chosen": chosen, "inputs": inputs,
                     "random_next": random_b, "swapped": 0, "doc": row, "b_doc": (row + 1) % n if random_b else row})
    return rows


def write_pairs(root: Path, tok, n_train: int = 1200, n_validation: int = 200) -> StageRecord:
    for split, n, seed in (("train", n_train, 0), ("validation", n_validation, 1)):
        write_pairs_rows(root / split, motif_rows(tok, n, seed), tok.cls_token_id, tok.sep_token_id, len(tok))
    return record("pairs", root)


@pytest.fixture
def upstream(tmp_path: Path) -> dict[str, StageRecord]:
    tok_record = write_tokenizer(tmp_path / "up" / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_record.dir))
    return {"tokenizer": tok_record, "pairs": write_pairs(tmp_path / "up" / "pairs", tok)}


STEPS = 200
TINY = ("teacher.hidden_size=32", "teacher.num_layers=2", "teacher.num_heads=2", "teacher.intermediate_size=64",
        "teacher.max_position_embeddings=64", "teacher.train.batch_size=16", "teacher.train.effective_batch_size=32",
        f"teacher.train.max_steps={STEPS}", "teacher.train.learning_rate=5e-3", "teacher.train.warmup_steps=10",
        "teacher.train.checkpoint_every=20", "teacher.train.eval_every=50", "teacher.train.log_every=10")


def test_teacher_pretrains_and_beats_the_trivial_baseline(make_config, workdir, upstream):
    logged: list[tuple[dict, int]] = []
    cfg = make_config(*TINY)
    rec = run_stage(SPECS["teacher"], cfg, workdir, upstream, metrics_sink=lambda m, s: logged.append((m, s)))
    counts = rec.manifest["counts"]
    assert counts["steps"] == STEPS and counts["tokens_seen"] > 0 and counts["train_tokens_per_s"] > 0
    assert counts["val_mlm_accuracy"] > 3 * counts["baseline_mlm_accuracy"], counts
    assert counts["val_mlm_accuracy"] > 0.25 and counts["val_nsp_accuracy"] > 0.75, counts
    assert 1.0 < counts["val_mlm_perplexity"] < len(WORDS), counts
    assert counts["parameters"] == sum(p.numel() for p in BertForPreTraining.from_pretrained(
        rec.dir / "model").parameters())
    # the output is the model with its tokenizer; the checkpoints are gone
    assert not (rec.dir / "checkpoints").exists()
    assert (rec.dir / "model" / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(rec.dir / "model"))
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(str(upstream["tokenizer"].dir)).get_vocab()
    # training curves and the validation metrics reached the sink
    steps_with_loss = [s for m, s in logged if "train_mlm_loss" in m]
    assert steps_with_loss[:2] == [10, 20] and any("val_mlm_accuracy" in m for m, s in logged if s == 50)
    # the same key again: reused, not retrained
    assert run_stage(SPECS["teacher"], cfg, workdir, upstream).cached


def test_interrupted_teacher_resumes_from_its_checkpoint(make_config, workdir, upstream):
    cfg = make_config(*TINY, "teacher.train.max_steps=60")

    def interrupt(metrics: dict, step: int | None) -> None:
        if step == 50 and "train_loss" in metrics:
            raise KeyboardInterrupt  # as a Ctrl-C between two steps

    with pytest.raises(KeyboardInterrupt):
        run_stage(SPECS["teacher"], cfg, workdir, upstream, metrics_sink=interrupt)
    assert not (workdir / "teacher").exists()
    rec = run_stage(SPECS["teacher"], cfg, workdir, upstream)
    assert rec.manifest["resumed"] and rec.manifest["details"]["resumed_from_step"] == 40
    assert rec.manifest["counts"]["steps"] == 60
    assert not (rec.dir / "checkpoints").exists()


def test_pretrained_checkpoint_replaces_pretraining(make_config, workdir, upstream, tmp_path):
    # a "downloaded" BERT: saved by save_pretrained with its own tokenizer; the tokenizer stage copies
    # that tokenizer (as tasks/tokenizer/ does when teacher.pretrained is set)
    source = tmp_path / "my-bert"
    tok = AutoTokenizer.from_pretrained(str(upstream["tokenizer"].dir))
    torch.manual_seed(3)
    model = build_bert_for_pretraining(bert_config(len(tok), 32, 2, 2, 64, 64))
    model.save_pretrained(source, safe_serialization=True)
    tok.save_pretrained(source)
    logged: list[dict] = []
    cfg = make_config(*TINY, f"teacher.pretrained={source}")
    rec = run_stage(SPECS["teacher"], cfg, workdir, upstream, metrics_sink=lambda m, s: logged.append(m))
    counts = rec.manifest["counts"]
    assert counts["steps"] == 0 and counts["tokens_seen"] == 0
    assert not any("train_loss" in m for m in logged)  # no training step ran
    assert "val_mlm_accuracy" in counts and "baseline_mlm_accuracy" in counts
    assert rec.manifest["details"]["nsp_head_trained"] is True
    saved = BertForPreTraining.from_pretrained(rec.dir / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved.state_dict()[name]), name
    assert AutoTokenizer.from_pretrained(str(rec.dir / "model")).get_vocab() == tok.get_vocab()
    # training settings do not matter to a pretrained teacher: changing them keeps the stage
    cfg2 = make_config(*TINY, f"teacher.pretrained={source}", "teacher.train.max_steps=7")
    assert run_stage(SPECS["teacher"], cfg2, workdir, upstream).cached


def save_bert_model(source: Path, tok, seed: int = 3):
    """A bare BertModel checkpoint (architectures ["BertModel"]: no MLM or NSP head), as a sentence
    encoder or a fine-tuned model's backbone is saved, with its tokenizer and a sentence-transformers
    pooling config beside it."""
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(bert_config(len(tok), 32, 2, 2, 64, 64))
    model.save_pretrained(source, safe_serialization=True)
    tok.save_pretrained(source)
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}')
    return model


def test_bert_model_checkpoint_is_a_headless_teacher(make_config, workdir, upstream, tmp_path):
    from transformers import BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(upstream["tokenizer"].dir))
    model = save_bert_model(tmp_path / "encoder-only", tok)
    cfg = make_config(*TINY, f"teacher.pretrained={tmp_path / 'encoder-only'}", "teacher.mlm_head=none")
    rec = run_stage(SPECS["teacher"], cfg, workdir, upstream)
    details, counts = rec.manifest["details"], rec.manifest["counts"]
    assert details["mlm_head"] == "none" and details["nsp_head_trained"] is False
    assert details["pooling"] == "mean" and details["can_teach"] == ["hidden_states"]
    assert "no MLM head" in details["can_teach_note"]
    assert details["architecture"] == {"layers": 2, "hidden_size": 32, "heads": 2, "intermediate_size": 64,
                                       "vocab_size": len(tok), "max_position_embeddings": 64,
                                       "parameters": sum(p.numel() for p in model.parameters())}
    assert details["provenance"] == {"kind": "path", "source": str((tmp_path / "encoder-only").resolve())}
    # no MLM metrics from a random head
    assert not any(k.startswith(("val_mlm", "val_nsp")) for k in counts)
    # the saved folder is the bare encoder, unchanged: nothing there to mistake for a trained head
    assert BertConfig.from_pretrained(rec.dir / "model").architectures == ["BertModel"]
    saved = load_saved(rec.dir)
    assert (saved.mlm_head, saved.nsp_head_trained, saved.pooling) == ("none", False, "mean")
    loaded = saved.load_model()
    assert isinstance(loaded, BertModel)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_fitted_head_on_a_bert_model_checkpoint(make_config, workdir, upstream, tmp_path):
    """teacher.mlm_head=fit: BERT's head is fitted on the frozen backbone; its held-out MLM accuracy is
    what the saved BertForPreTraining scores, and the backbone is the checkpoint's, untouched."""
    tok = AutoTokenizer.from_pretrained(str(upstream["tokenizer"].dir))
    model = save_bert_model(tmp_path / "encoder-only", tok)
    logged: list[dict] = []
    cfg = make_config(*TINY, f"teacher.pretrained={tmp_path / 'encoder-only'}", "teacher.mlm_head=fit",
                      "teacher.mlm_head_fit.max_steps=40", "teacher.mlm_head_fit.batch_size=16",
                      "teacher.mlm_head_fit.effective_batch_size=16", "teacher.mlm_head_fit.learning_rate=1e-2",
                      "teacher.mlm_head_fit.warmup_steps=4", "teacher.mlm_head_fit.log_every=10")
    rec = run_stage(SPECS["teacher"], cfg, workdir, upstream, metrics_sink=lambda m, s: logged.append(m))
    details, counts = rec.manifest["details"], rec.manifest["counts"]
    assert details["mlm_head"] == "fitted" and details["nsp_head_trained"] is False
    assert details["can_teach"] == ["hidden_states", "soft_labels"]
    assert counts["mlm_head_fit_steps"] == 40 and counts["mlm_head_fit_seconds"] > 0
    assert "val_nsp_accuracy" not in counts  # the NSP head is random: not scored
    assert any("mlm_head_fit_train_mlm_loss" in m for m in logged)
    saved = BertForPreTraining.from_pretrained(rec.dir / "model")
    assert saved.config.architectures == ["BertForPreTraining"]
    for name, tensor in model.state_dict().items():  # the backbone did not move
        assert torch.equal(tensor, saved.bert.state_dict()[name]), name
    assert saved.cls.predictions.decoder.weight.data_ptr() == saved.bert.embeddings.word_embeddings.weight.data_ptr()
    # an independent evaluation of the saved teacher gives the reported accuracy, above an unfitted head's
    from tasks import engine

    val = load_split(upstream["pairs"].dir, "validation", columns=[*PRETRAINING_INPUTS, "length"])
    collate = teacher.pretraining_collator(tok)
    rt = engine.setup_runtime("fp32")
    metrics = teacher.evaluate_pretraining(saved.eval(), val, collate, 64, rt)
    assert counts["val_mlm_accuracy"] == pytest.approx(metrics["val_mlm_accuracy"], abs=1e-5)
    torch.manual_seed(0)
    unfitted = BertForPreTraining.from_pretrained(tmp_path / "encoder-only").eval()
    before = teacher.evaluate_pretraining(unfitted, val, collate, 64, rt)
    assert metrics["val_mlm_accuracy"] > before["val_mlm_accuracy"] + 0.02, (metrics, before)
    assert metrics["val_mlm_loss"] < before["val_mlm_loss"] - 0.05, (metrics, before)
    assert load_saved(rec.dir).mlm_head == "fitted"


def test_a_checkpoint_that_is_not_bert_is_refused(make_config, workdir, upstream, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    source = tmp_path / "not-bert"
    DistilBertModel(DistilBertConfig(vocab_size=41, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(source)
    cfg = make_config(*TINY, f"teacher.pretrained={source}")
    with pytest.raises(teacher.StageError, match="teacher.pretrained"):
        run_stage(SPECS["teacher"], cfg, workdir, upstream)
    assert read_manifest(workdir / "teacher") is None


@pytest.mark.slow
def test_smoke_teacher_beats_the_trivial_baseline(smoke_stages):
    """The smoke preset's own teacher, on the embedded corpora, learned more than token frequencies: its
    held-out MLM accuracy is above always answering the commonest masked token, and its held-out loss is
    below the best context-free model's (the train split's label frequencies, add-1/2 smoothed). Seen: 0.032
    against 0.027, and 6.49 against 6.55 nats."""
    counts = smoke_stages["records"]["teacher"].manifest["counts"]
    assert counts["steps"] == smoke_stages["config"].teacher.train.max_steps
    assert counts["val_mlm_accuracy"] > counts["baseline_mlm_accuracy"], counts
    pairs_dir = smoke_stages["records"]["pairs"].dir
    train, val = (load_split(pairs_dir, split).label_counts() for split in ("train", "validation"))
    size = max(len(train), len(val))
    train, val = np.pad(train, (0, size - len(train))) + 0.5, np.pad(val, (0, size - len(val)))
    unigram_loss = float(-(val * np.log(train / train.sum())).sum() / val.sum())
    assert counts["val_mlm_loss"] < unigram_loss - 0.03, (counts["val_mlm_loss"], unigram_loss)
