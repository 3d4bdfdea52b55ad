"""Test helpers: a tiny corpus-stage-shaped output (train/ and validation/ Arrow datasets) and the
stage record that downstream stages receive for it."""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, Features, List, Value

from tasks.artifacts import hash_tree, sha256_json
from tasks.stage import StageRecord

# A small hand-written lexicon: common words, suffixes that WordPiece splits off, an accented word
# (café) and CJK text, so the tokenizer tests see all three.
WORDS = (
    "the a of and to in is was for on that with as by at from it his her their this river city "
    "council station music film player team season school church village report market company "
    "government minister director century island bridge mountain railway museum festival album "
    "building buildings played playing plays founded founding northern southern eastern western "
    "historical history historian national international café naïve "
).split()
CORPUS_FEATURES = Features({"id": Value("string"), "source": Value("string"), "title": Value("string"),
                            "sentences": List(Value("string"))})
CJK = ("東京", "大学", "日本語", "学校", "北京")
# Made-up words from syllables give the vocabulary trainer enough distinct words to fill a vocabulary.
SYLLABLES = "ka ri to ne sa mu lo ve di pan tor mel shi gra bun fe ol ast ix que".split()


def synthetic_word(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def synthetic_sentence(rng: random.Random) -> str:
    words = [synthetic_word(rng) for _ in range(rng.randint(5, 14))]
    if rng.random() < 0.1:
        words.insert(rng.randrange(len(words)), rng.choice(CJK))
    return " ".join(words).capitalize() + rng.choice(".!?")


def synthetic_documents(n_docs: int, seed: int = 0, min_sentences: int = 2, max_sentences: int = 12,
                        prefix: str = "doc") -> dict[str, list]:
    """Columns of a corpus split: id, source, title, sentences (list[str])."""
    rng = random.Random(seed)
    sentences = [[synthetic_sentence(rng) for _ in range(rng.randint(min_sentences, max_sentences))]
                 for _ in range(n_docs)]
    return {
        "id": [f"{prefix}-{i}" for i in range(n_docs)],
        "source": ["synthetic"] * n_docs,
        "title": [f"Document {i}" for i in range(n_docs)],
        "sentences": sentences,
    }


def write_corpus(root: Path, train: dict[str, list], validation: dict[str, list]) -> StageRecord:
    """Save the two splits as the corpus stage does and return its StageRecord."""
    root.mkdir(parents=True, exist_ok=True)
    for name, columns in (("train", train), ("validation", validation)):
        Dataset.from_dict(columns, features=CORPUS_FEATURES).save_to_disk(str(root / name))
    manifest = {"output_fingerprint": sha256_json(hash_tree(root))}
    return StageRecord(name="corpus", dir=root, manifest=manifest, cached=False, reason="test corpus")


def synthetic_corpus(root: Path, n_train: int = 200, n_validation: int = 40, seed: int = 0, **kw) -> StageRecord:
    return write_corpus(root, synthetic_documents(n_train, seed, prefix="train", **kw),
                        synthetic_documents(n_validation, seed + 1, prefix="val", **kw))


def tiny_overrides(corpus_dir: Path, *extra: str) -> list[str]:
    return [
        f"corpus.sources=[{{path: '{corpus_dir}', txt_documents: file}}]",
        "corpus.validation_fraction=0.2",
        "tokenizer.vocab_size=300",
        "tokenizer.min_frequency=1",
        "pairs.max_seq_len=32",
        "pairs.dupe_factor=2",
        "teacher.train.max_steps=6",
        "teacher.train.batch_size=8",
        "teacher.train.effective_batch_size=8",
        "teacher.train.warmup_steps=2",
        "teacher.train.eval_every=0",
        "teacher.train.checkpoint_every=3",
        "distilbert.train.max_steps=4",
        "distilbert.train.batch_size=8",
        "distilbert.train.effective_batch_size=8",
        "distilbert.train.warmup_steps=1",
        "distilbert.train.checkpoint_every=2",
        "albert.train.max_steps=4",
        "albert.train.batch_size=8",
        "albert.train.effective_batch_size=8",
        "albert.train.warmup_steps=1",
        "albert.train.checkpoint_every=2",
        "evaluate.latency_sentences=8",
        "evaluate.latency_repeats=2",
        "evaluate.downstream.max_train_examples=160",
        "evaluate.downstream.batch_size=16",
        "evaluate.downstream.max_seq_len=32",
        "evaluate.downstream.cpu_threads=1",
        "evaluate.plots=true",
        # two exports (about 5 s each, whatever the size): the reference classifier and a student's
        "export.models=[lightbert-teacher-movie-sentences, lightbert-distilbert-movie-sentences]",
        "run.num_proc=1",
        "run.progress=false",
        *extra,
    ]


def wait_until_healthy(url: str, proc, seconds: float, what: str) -> None:
    """Poll `url` until it answers 200; fail if `proc` exits first or `seconds` pass."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not answer {url} in {seconds:.0f} s"
        time.sleep(0.5)


# Every key a report.json model entry carries (tasks/evaluate/ documents them).
REPORT_ENTRY_KEYS = {
    "name", "registered_name", "family", "path", "source_fingerprint", "parameters", "parameters_with_heads",
    "disk_bytes", "mlm_accuracy", "mlm_perplexity", "mlm_loss", "pair_head", "nsp_accuracy", "nsp_accuracy_ci95",
    "sop_accuracy", "sop_accuracy_ci95", "embedding_spearman", "cpu_latency_ms", "cpu_latency_pass_seconds",
    "cpu_latency_passes", "gpu_throughput_sequences_per_s", "downstream", "downstream_score",
    "downstream_validation", "parameter_ratio", "retention", "speedup",
}


def check_report(report: dict, models: list[str], seeds: list[int]) -> None:
    """report.json as tasks/evaluate/ documents it, with numbers that hang together."""
    import math

    import pytest

    assert report["schema"] == 2 and report["reference"] == "teacher"
    assert report["machine"]["matmul_gflops"] > 0 and report["pipeline_seconds"]["total"] > 0
    assert [e["name"] for e in report["models"]] == models
    protocol = report["protocol"]
    assert protocol["latency"]["batch_size"] == 1 and protocol["latency"]["threads"] >= 1
    assert protocol["downstream"]["seeds"] == seeds and len(protocol["fingerprint"]) == 16
    teacher = report["models"][0]
    assert 0 < report["baselines"]["mlm_commonest_token_accuracy"] < 1
    for e in report["models"]:
        assert REPORT_ENTRY_KEYS <= set(e), REPORT_ENTRY_KEYS - set(e)
        assert e["parameters"] > 0 and e["parameters_with_heads"] >= e["parameters"] and e["disk_bytes"] > 0
        if e["mlm_accuracy"] is not None:
            assert 0 <= e["mlm_accuracy"] <= 1 and e["mlm_perplexity"] == pytest.approx(math.exp(e["mlm_loss"]))
            assert e["retention"]["mlm_perplexity"] == teacher["mlm_perplexity"] / e["mlm_perplexity"]
        for task in ("nsp", "sop"):
            acc, ci = e[f"{task}_accuracy"], e[f"{task}_accuracy_ci95"]
            if e["pair_head"] is None:
                assert acc is None and ci is None
            else:
                assert ci[0] <= acc <= ci[1]
        assert len(e["cpu_latency_passes"]) == protocol["latency"]["repeats"] and e["cpu_latency_ms"] > 0
        for task, res in e["downstream"].items():
            metric = res["metric"]
            expected = {"finetuned"} if e["name"] == "teacher" else {"distilled", "hard"}
            assert set(res["modes"]) == expected
            for mode in res["modes"].values():
                runs = mode["runs"]
                assert [r["seed"] for r in runs] == (seeds[:1] if e["name"] == "teacher" else seeds)
                assert mode["test"][metric] == pytest.approx(sum(r["test"][metric] for r in runs) / len(runs))
                low, high = mode["test_ci95"]
                assert low <= mode["test"][metric] + 1e-9 and mode["test"][metric] <= high + 1e-9
                assert mode["collapsed"] == any(r["collapsed"] for r in runs)
            if e["name"] != "teacher":
                gain = res["gain"]
                assert gain["difference"] == pytest.approx(res["modes"]["distilled"]["test"][metric]
                                                           - res["modes"]["hard"]["test"][metric])
                assert gain["ci95"][0] <= gain["ci95"][1]
            mine = res["modes"][res["headline"]]
            ref = teacher["downstream"][task]["modes"]["finetuned"]
            ratio = e["retention"][f"downstream/{task}"]
            if mine["collapsed"] or ref["collapsed"]:
                assert ratio is None
            else:
                assert ratio == pytest.approx(mine["test"][metric] / ref["test"][metric])
        if e["downstream_score"] is not None and teacher["downstream_score"] is not None:
            assert e["retention"]["downstream_score"] == e["downstream_score"] / teacher["downstream_score"]
        assert e["speedup"]["cpu_latency"] == teacher["cpu_latency_ms"] / e["cpu_latency_ms"]
        assert e["parameter_ratio"] == e["parameters"] / teacher["parameters"]
    assert teacher["speedup"]["cpu_latency"] == 1.0



def write_pairs_rows(split_dir: Path, rows: list[dict], cls_id: int, sep_id: int, vocab: int) -> None:
    """A pairs-stage split (tasks/pairs/outputs.py's format, one shard) from rows of: a, b_prime, b (the
    original segments; b None when B' is B), chosen (masked positions in the run a + b_prime [+ b]),
    inputs (the run as the model sees it), random_next, swapped, doc, b_doc."""
    import numpy as np

    from tasks.pairs import outputs

    runs = [np.asarray(r["inputs"]) for r in rows]
    originals = [np.concatenate([r["a"], r["b_prime"]] + ([] if r["b"] is None else [r["b"]])) for r in rows]
    chosen = [np.asarray(r["chosen"], dtype=np.int64) for r in rows]
    arrays = {
        "tokens": np.concatenate(runs).astype(np.uint16),
        "offsets": np.concatenate([[0], np.cumsum([len(x) for x in runs])]).astype(np.int64),
        "lengths": np.array([(len(r["a"]), len(r["b_prime"]), 0 if r["b"] is None else len(r["b"])) for r in rows],
                            dtype=np.uint16),
        "label_offsets": np.concatenate([[0], np.cumsum([len(c) for c in chosen])]).astype(np.int64),
        "label_positions": np.concatenate(chosen).astype(np.uint16),
        "label_ids": np.concatenate([o[c] for o, c in zip(originals, chosen, strict=True)]).astype(np.uint16),
        "next_sentence_label": np.array([r["random_next"] for r in rows], dtype=np.int8),
        "sentence_order_label": np.array([r["swapped"] for r in rows], dtype=np.int8),
        "doc_index": np.array([r["doc"] for r in rows], dtype=np.int64),
        "nsp_b_doc_index": np.array([r["b_doc"] for r in rows], dtype=np.int64),
    }
    split_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_shard(split_dir / "shard-00000", arrays)
    outputs.write_split_file(split_dir, [{"dir": "shard-00000", "examples": len(rows)}],
                             {"cls_token_id": cls_id, "sep_token_id": sep_id, "vocab_size": vocab})


def write_pairs(split_dir: Path, n: int, seed: int, vocab: int, cls_id: int = 2, sep_id: int = 3,
                mask_id: int = 4) -> None:
    """n hand-made examples over token ids 5..vocab-1, varied lengths: every 7th example (3, 10, ...) has
    no masked position, every 5th a random B', about half swapped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for row in range(n):
        a, b = (rng.integers(5, vocab, size=int(rng.integers(2, 19))) for _ in range(2))
        random_next = row % 5 == 1
        b_prime = rng.integers(5, vocab, size=int(rng.integers(2, 19))) if random_next else b
        run = np.concatenate([a, b_prime, b] if random_next else [a, b])
        chosen = np.zeros(0, dtype=np.int64) if row % 7 == 3 else \
            np.sort(rng.choice(len(run), size=max(1, round(0.15 * len(run))), replace=False))
        inputs = run.copy()
        inputs[chosen[rng.random(len(chosen)) < 0.8]] = mask_id
        rows.append({"a": a, "b_prime": b_prime, "b": b if random_next else None, "chosen": chosen, "inputs": inputs,
                     "random_next": int(random_next), "swapped": int(rng.random() < 0.5), "doc": row,
                     "b_doc": (row + 1) % n if random_next else row})
    write_pairs_rows(split_dir, rows, cls_id, sep_id, vocab)


def tiny_export_workdir(root: Path) -> dict:
    """A tiny run's models and a finished export stage, built with the real stage code: a 2-layer x 32 BERT
    "teacher" encoder and a 2-layer DistilBERT fine-tuned on a keyword task (a local CSV whose label is
    which of two word lists the sentence holds), the teacher and the classifier exported by tasks/export/
    (export.models; the DistilBERT encoder is saved, not exported). Returns {"config", "workdir",
    "upstream", "record", "task", "classifier"}."""
    import csv

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from models.distilbert import student_config
    from tasks import engine
    from tasks.config import load_config
    from tasks.downstream import data as downstream
    from tasks.downstream import finetune
    from tasks.downstream.config import DownstreamConfig
    from tasks.pipeline import SPECS
    from tasks.stage import run_stage

    positive, negative = "good great lovely superb".split(), "bad awful dull poor".split()
    neutral = "the a film movie story actor plot scene music ending cast script was is and of with it this".split()
    rng = random.Random(0)
    csv_path = root / "keywords.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(600):
            words = [rng.choice(neutral) for _ in range(rng.randint(4, 14))]
            words.insert(rng.randint(0, len(words)), rng.choice(positive if i % 2 else negative))
            writer.writerow([" ".join(words), "positive" if i % 2 else "negative"])
    cfg, _ = load_config("smoke", overrides=[
        "run.progress=false", f"evaluate.downstream.tasks=[{{name: keywords, path: '{csv_path}'}}]",
        "evaluate.downstream.max_seq_len=32", "export.check_examples=24", "export.check_batch_size=5",
        "export.models=[lightbert-teacher, lightbert-distilbert-keywords]"])
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *positive, *negative,
                                               *neutral]) + "\n")
    tok = BertTokenizerFast(vocab=str(root / "vocab.txt"))
    bert = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    teacher_dir = root / "teacher" / "model"
    BertModel(bert).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    student_dir = root / "distilbert" / "model"
    from transformers import DistilBertForMaskedLM

    DistilBertForMaskedLM(student_config(bert, 2)).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    data, info = downstream.load_task(cfg.evaluate.downstream.tasks[0], cfg.evaluate.downstream, root / "cache")
    dcfg = DownstreamConfig(epochs=3.0, batch_size=16, learning_rates={"bert": [3e-3], "distilbert": [3e-3],
                            "albert": [3e-3]}, warmup_fraction=0.1, dropout=0.0, max_seq_len=32, evals_per_epoch=1)
    fit = finetune.fit(student_dir, finetune.tokenize_task(data, student_dir, 32), info, dcfg, learning_rate=3e-3,
                       seed=0, rt=engine.setup_runtime("fp32"))
    classifier_dir = root / "task_distill" / "keywords" / "distilbert" / "distilled" / "model"
    finetune.save_model(fit.model, classifier_dir, student_dir)
    models = {"teacher": [{"path": "model", "name": "lightbert-teacher"}],
              "distilbert": [{"path": "model", "name": "lightbert-distilbert"}], "albert": [], "task_teacher": [],
              "task_distill": [{"path": "keywords/distilbert/distilled/model", "name": "lightbert-distilbert-keywords",
                                "task": "text-classification"}]}
    upstream = {name: StageRecord(name, root / name, {"output_fingerprint": f"{name}-0", "models": entries},
                                  cached=True, reason="test") for name, entries in models.items()}
    workdir = root / "work"
    record = run_stage(SPECS["export"], cfg, workdir, upstream)
    return {"config": cfg, "workdir": workdir, "upstream": upstream, "record": record, "task": (data, info),
            "classifier": classifier_dir}
