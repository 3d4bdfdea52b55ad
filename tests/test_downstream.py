"""tasks/downstream.py: the movie-sentences task fetched for real from the package registry, its
deterministic splits, fine-tuning of tiny saved BERT / DistilBERT / ALBERT checkpoints on a learnable
synthetic task, and the GLUE path's offline error."""

from __future__ import annotations

import hashlib
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertConfig, BertForPreTraining, BertTokenizerFast, DistilBertForMaskedLM

from models.albert import albert_config, albert_layers, build_albert_for_pretraining
from models.distilbert import student_config
from tasks.config import ConfigError, DownstreamConfig, SourceSpec
from tasks.downstream import (
    MOVIE_SENTENCES,
    finetune,
    load_classifier,
    load_task,
    read_movie_sentences,
    split_by_id,
)
from tasks.sources import FETCHED_MARKER, embedded_sources, fetch_embedded, resolve_source
from tasks.stage import StageError


# ------------------------------------------------------------------------------------------------
# movie-sentences
# ------------------------------------------------------------------------------------------------
def test_real_movie_sentences_from_the_registry(tmp_path: Path) -> None:
    """The one test here that uses the package index: pip download of the vaderSentiment sdist, the
    inner archive and member checked, then counts, labels and splits; a second load runs no pip."""
    cache = tmp_path / "cache"
    cfg = DownstreamConfig()
    data, info = load_task(MOVIE_SENTENCES, cfg, cache)
    entry = embedded_sources()[MOVIE_SENTENCES]
    folder = cache / "sources" / MOVIE_SENTENCES
    marker = folder / FETCHED_MARKER
    assert info["data_sha256"] == entry["member_sha256"]
    assert (folder / entry["member"]).is_file() and marker.is_file()
    assert [p.name for p in (cache / "sources").iterdir()] == [MOVIE_SENTENCES]  # no temp folder left

    assert (info["rows_read"], info["dropped_zero_rating"], info["invalid_utf8_rows"]) == (10_605, 37, 0)
    total = sum(info["counts"].values())
    assert total == 10_568
    per_label = {k: sum(info["label_counts"][s].get(k, 0) for s in info["label_counts"]) for k in ("0", "1")}
    assert per_label == {"0": 5_326, "1": 5_242}
    ids = {s: data[s]["id"] for s in data}
    assert set(data["train"].column_names) == {"id", "text", "label"}
    assert not (set(ids["train"]) & set(ids["validation"]) or set(ids["train"]) & set(ids["test"])
                or set(ids["validation"]) & set(ids["test"]))
    assert len(set().union(*ids.values())) == total
    for split, fraction in (("validation", cfg.validation_fraction), ("test", cfg.test_fraction)):
        assert abs(info["counts"][split] / total - fraction) < 0.015
    assert all(isinstance(t, str) and t and "\r" not in t for t in data["test"]["text"])

    # Again from the cache: same ids, same fingerprint, and the fetched folder untouched (a second
    # pip run would have replaced it, marker included).
    stat = marker.stat()
    again, info2 = load_task(MOVIE_SENTENCES, cfg, cache)
    assert {s: again[s]["id"] for s in again} == ids and info2["fingerprint"] == info["fingerprint"]
    assert (marker.stat().st_ino, marker.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    # A train cap keeps a subset of the train split and leaves validation and test alone.
    capped, info3 = load_task(MOVIE_SENTENCES, cfg.model_copy(update={"max_train_examples": 1000}), cache)
    assert len(capped["train"]) == 1000 and set(capped["train"]["id"]) <= set(ids["train"])
    assert capped["test"]["id"] == ids["test"] and info3["fingerprint"] != info["fingerprint"]

    with pytest.raises(ConfigError, match="'movie-sentences' is a downstream data set, not a corpus"):
        resolve_source(SourceSpec(name=MOVIE_SENTENCES), 0, cache)


def wheel_with_inner_archive(folder: Path) -> tuple[Path, str]:
    """A local wheel holding a tar.gz that holds the member (as the vaderSentiment sdist does); the
    inner archive's sha256."""
    inner = folder / "inner.tar.gz"
    member = folder / "data.txt"
    member.write_text("1\t1.5\tNice.\r\n")
    with tarfile.open(inner, "w:gz") as tf:
        tf.add(member, arcname="inner/data.txt")
    wheel = folder / "lbinner-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(inner, "lbinner/res/inner.tar.gz")
        zf.writestr("lbinner-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: lbinner\nVersion: 1.0\n")
        zf.writestr("lbinner-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")
        zf.writestr("lbinner-1.0.dist-info/RECORD", "")
    return wheel, hashlib.sha256(inner.read_bytes()).hexdigest()


def test_member_of_an_archive_inside_the_package(tmp_path: Path) -> None:
    wheel, inner_sha = wheel_with_inner_archive(tmp_path)
    entry = {"requirement": str(wheel), "inner_archive": "lbinner/res/inner.tar.gz", "inner_archive_sha256": inner_sha,
             "member": "inner/data.txt"}
    folder, marker = fetch_embedded("nested", entry, tmp_path / "cache")
    assert (folder / "inner/data.txt").read_bytes() == b"1\t1.5\tNice.\r\n"
    assert marker["archive"] == wheel.name and marker["inner_archive_sha256"] == inner_sha
    with pytest.raises(StageError, match=r"lbinner/res/inner.tar.gz: sha256 mismatch.*Nothing was cached"):
        fetch_embedded("nested-bad", {**entry, "inner_archive_sha256": "0" * 64}, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "sources").iterdir()) == ["nested"]


def test_reading_drops_zero_ratings_and_flags_invalid_utf8(tmp_path: Path) -> None:
    f = tmp_path / "snippets.txt"
    f.write_bytes(b"1\t2.5\tA fine film.\r\n2\t0\tNeither here nor there.\r\n3\t-1.25\tPrice \xa3 too high.\r\n"
                  b"4\t-0.1\tMeh")
    cols, stats = read_movie_sentences(f)
    assert cols["id"] == ["1", "3", "4"] and cols["label"] == [1, 0, 0]
    assert cols["text"][0] == "A fine film." and "\ufffd" in cols["text"][1]
    assert stats == {"rows": 4, "zero_rating": 1, "invalid_utf8": 1}
    f.write_bytes(b"1\tgood\tNot a rating.\r\n")
    with pytest.raises(StageError, match="line 1 is not 'id<TAB>rating<TAB>sentence'"):
        read_movie_sentences(f)


def test_splits_depend_on_ids_not_row_order() -> None:
    ids = [str(i) for i in range(3000)]
    shuffled = random.Random(0).sample(ids, len(ids))
    a, b = split_by_id("t", ids, 0.1, 0.2, None), split_by_id("t", shuffled, 0.1, 0.2, None)
    assert {s: {ids[i] for i in a[s]} for s in a} == {s: {shuffled[i] for i in b[s]} for s in b}
    assert abs(len(a["test"]) / 3000 - 0.2) < 0.03 and abs(len(a["validation"]) / 3000 - 0.1) < 0.03


def test_glue_offline_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(StageError) as err:
        load_task("glue/sst2", DownstreamConfig(), tmp_path)
    msg = str(err.value)
    assert "glue/sst2" in msg and "Hugging Face hub" in msg and "HF_DATASETS_OFFLINE" in msg
    assert "movie-sentences" in msg
    with pytest.raises(ConfigError, match="glue/stsb is not a GLUE accuracy task"):
        load_task("glue/stsb", DownstreamConfig(), tmp_path)


# ------------------------------------------------------------------------------------------------
# fine-tuning tiny saved checkpoints on a learnable task
# ------------------------------------------------------------------------------------------------
POSITIVE = "good great lovely superb".split()
NEGATIVE = "bad awful dull poor".split()
NEUTRAL = ("the a film movie story actor plot scene music ending cast script was is and of with it this "
           "director camera long short").split()


def synthetic_task(n: int, seed: int) -> Dataset:
    """Neutral words with one sentiment word somewhere: the label is which kind it is."""
    rng = random.Random(seed)
    cols: dict[str, list] = {"id": [], "text": [], "label": []}
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        cols["id"].append(f"{seed}-{i}")
        cols["text"].append(" ".join(words))
        cols["label"].append(label)
    return Dataset.from_dict(cols)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERT, DistilBERT and ALBERT (attention shared across layers) saved with a tokenizer,
    as the pipeline's stages save them."""
    root = tmp_path_factory.mktemp("downstream-models")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab))
    size = len(tok)
    bert = BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    models = {
        "bert": BertForPreTraining(bert),
        "distilbert": DistilBertForMaskedLM(student_config(bert, 2)),
        "albert": build_albert_for_pretraining(albert_config(size, 16, 32, 2, 2, 64, 64, sharing="attention")),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def synthetic_data() -> DatasetDict:
    return DatasetDict({"train": synthetic_task(320, 0), "validation": synthetic_task(64, 1),
                        "test": synthetic_task(200, 2)})


FINETUNE = DownstreamConfig(epochs=6, batch_size=16, learning_rate=3e-3, warmup_fraction=0.1, dropout=0.0,
                            max_seq_len=32)


@pytest.mark.parametrize("family", ["bert", "distilbert", "albert"])
def test_finetuning_learns(family: str, checkpoints, synthetic_data, one_torch_thread) -> None:
    res = finetune(checkpoints[family], synthetic_data, FINETUNE, seed=3)
    assert res["model_type"] == family and res["device"] == "cpu" and res["precision"] == "fp32"
    assert (res["train_examples"], res["validation_examples"], res["test_examples"]) == (320, 64, 200)
    assert res["steps"] == 6 * 20
    assert res["test_accuracy"] >= 0.9, res
    low, high = res["test_accuracy_ci95"]
    assert low < res["test_accuracy"] <= high + 1e-9
    assert res["train_tokens_per_second"] > 0 and res["seconds"] >= res["train_seconds"] > 0


def test_albert_classifier_keeps_the_sharing_ties(checkpoints) -> None:
    model = load_classifier(checkpoints["albert"], num_labels=2, dropout=0.1)
    layers = albert_layers(model)
    assert len(layers) == 2 and layers[0].attention is layers[1].attention and layers[0].ffn is not layers[1].ffn
    assert model.config.classifier_dropout_prob == 0.1


def test_same_seed_same_result_on_cpu(checkpoints, synthetic_data, one_torch_thread) -> None:
    cfg = FINETUNE.model_copy(update={"epochs": 0.5, "dropout": 0.1})
    timing = ("seconds", "train_seconds", "train_tokens_per_second")
    a, b = (finetune(checkpoints["albert"], synthetic_data, cfg, seed=7) for _ in range(2))
    assert a["steps"] == 10  # half of 20 batches
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    c = finetune(checkpoints["albert"], synthetic_data, cfg, seed=8)
    assert c["final_train_loss"] != a["final_train_loss"]
