"""Bad corpus input as a new user brings it: each case gets an error that names the file and the fix, or
is skipped and listed; nothing is built from garbage and no stage output is left half-written."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.pipeline import SPECS
from tasks.stage import StageError, run_stage


@pytest.fixture
def build(make_config, tmp_path: Path):
    def _build(sources: list[dict], *overrides: str):
        cfg = make_config(f"corpus.sources={json.dumps(sources)}", f"run.cache_dir={tmp_path / 'cache'}",
                          "run.num_proc=1", "corpus.validation_fraction=0.2", *overrides)
        return run_stage(SPECS["corpus"], cfg, tmp_path / "work", {})

    return _build


def prose(n_docs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "river city market player season album film company school music energy water".split()
    docs = []
    for d in range(n_docs):
        docs.append(" ".join(f"The {' '.join(rng.choices(words, k=8))} number {d} {s}." for s in range(4)))
    return "\n\n".join(docs) + "\n"


def assert_nothing_built(workdir: Path) -> None:
    assert not (workdir / "corpus").exists()
    assert not list((workdir / ".partial").glob("corpus-*/train")) if (workdir / ".partial").exists() else True


def test_random_bytes_named_txt_are_refused_with_the_share(build, tmp_path):
    garbage = tmp_path / "notes.txt"
    garbage.write_bytes(random.Random(0).randbytes(2_000_000).replace(b"\x00", b"\x01"))
    with pytest.raises(StageError) as err:
        build([{"path": str(garbage)}])
    message = str(err.value)
    assert str(garbage) in message and "invalid UTF-8 or control characters" in message
    assert "corpus.max_bad_char_share" in message and "%" in message
    assert_nothing_built(tmp_path / "work")


def test_a_latin1_file_with_a_few_bad_bytes_is_read_and_counted(build, tmp_path):
    text = prose(20).replace("river", "rivière")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(text.encode("latin-1"))
    rec = build([{"path": str(latin)}])
    stats = json.loads((rec.dir / "stats.json").read_text())["totals"]
    assert stats["documents_read"] == 20 and stats["documents_with_invalid_utf8"] > 0


def test_an_empty_file_gets_a_one_line_error_naming_it(build, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(StageError) as err:
        build([{"path": str(empty)}])
    assert str(err.value).count("\n") == 0 and str(empty) in str(err.value) and "is empty" in str(err.value)
    assert_nothing_built(tmp_path / "work")


def test_a_folders_binary_and_empty_files_are_skipped_and_listed(build, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(prose(30, 1), encoding="utf-8")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("inner.txt", prose(30, 2))
    (folder / "b.txt").write_bytes(archive.getvalue())  # a zip archive named .txt
    (folder / "c.txt").write_bytes(b"")
    rec = build([{"path": str(folder)}])
    skipped = {Path(s["file"]).name: s["reason"] for s in rec.manifest["inputs"][0]["skipped"]}
    assert skipped == {"b.txt": "binary: a zip archive", "c.txt": "empty"}
    assert rec.manifest["inputs"][0]["files"] == 1 and rec.manifest["inputs"][0]["files_skipped"] == 2
    stats = json.loads((rec.dir / "stats.json").read_text())["totals"]
    assert stats["documents_read"] == 30  # a.txt only: nothing from the archive's bytes
    warning = next(w for w in rec.manifest["details"]["warnings"] if "skipped" in w)
    assert "b.txt (binary: a zip archive)" in warning and "c.txt (empty)" in warning


def test_a_zip_named_txt_alone_is_refused(build, tmp_path):
    archive = tmp_path / "corpus.txt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("inner.txt", prose(5))
    with pytest.raises(StageError, match=r"is not text but a zip archive: extract or convert it"):
        build([{"path": str(archive)}])


def one_sentence_records(n_articles: int = 40, per_article: int = 5) -> list[dict]:
    return [{"text": f"Article {a} says thing number {s} about the river and the city.", "article": f"a{a}"}
            for a in range(n_articles) for s in range(per_article)]


def test_one_sentence_records_warn_and_group_by_a_field(build, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in one_sentence_records()), encoding="utf-8")
    with pytest.raises(StageError, match=r"all dropped .* group one-sentence records into documents"):
        build([{"path": str(path)}])
    mixed = tmp_path / "mixed.jsonl"  # 20 real documents among 200 one-sentence records
    whole = [{"text": prose(1, i), "article": f"w{i}"} for i in range(20)]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in whole + one_sentence_records()), encoding="utf-8")
    rec = build([{"path": str(mixed)}])
    warning = next(w for w in rec.manifest["details"]["warnings"] if "dropped" in w)
    assert "200 of 220 documents (91%) were dropped" in warning
    assert "group_by" in warning and "min_document_sentences" in warning

    grouped = build([{"path": str(path), "group_by": "article"}])
    stats = json.loads((grouped.dir / "stats.json").read_text())["totals"]
    assert stats["documents_read"] == 40 and stats["documents"] == 40 and stats["sentences"] == 200
    assert not [w for w in grouped.manifest["details"].get("warnings", []) if "dropped" in w]


def test_group_by_a_parquet_column_and_runs_of_lines(build, tmp_path):
    records = one_sentence_records(20, 4)
    table = pa.table({"text": [r["text"] for r in records], "article": [r["article"] for r in records]})
    pq.write_table(table, tmp_path / "records.parquet")
    rec = build([{"path": str(tmp_path / "records.parquet"), "group_by": "article"}])
    assert json.loads((rec.dir / "stats.json").read_text())["totals"]["documents"] == 20

    lines = tmp_path / "lines.txt"
    lines.write_text("".join(r["text"] + "\n" for r in records), encoding="utf-8")  # 80 lines
    rec = build([{"path": str(lines), "txt_documents": "line", "group_by": 4}])
    stats = json.loads((rec.dir / "stats.json").read_text())["totals"]
    assert stats["documents_read"] == 20 and stats["sentences"] == 80


def test_group_by_a_field_of_a_txt_file_is_refused(build, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(prose(5), encoding="utf-8")
    with pytest.raises(StageError, match=r"group_by names a field .* only \.jsonl and \.parquet"):
        build([{"path": str(path), "group_by": "article"}])
    with pytest.raises(StageError, match=r"no field 'topic' to group records by"):
        (tmp_path / "r.jsonl").write_text(json.dumps({"text": "x y z."}) + "\n", encoding="utf-8")
        build([{"path": str(tmp_path / "r.jsonl"), "group_by": "topic"}])
