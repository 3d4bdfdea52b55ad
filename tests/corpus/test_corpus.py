"""tasks/text.py and the corpus stage (tasks/corpus/), run through the real stage runner."""

from __future__ import annotations

import bz2
import hashlib
import json
import unicodedata
from pathlib import Path

import datasets
import pytest

from tasks.corpus.select import is_validation
from tasks.pipeline import SPECS
from tasks.stage import StageError, run_stage
from tasks.text import decode_utf8, normalize_paragraphs, process_document, split_sentences


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def test_normalisation_nfc_controls_whitespace() -> None:
    decomposed = "Cafe\u0301 ole\u0301"
    out = normalize_paragraphs(f"  {decomposed}\x00 is\tgood\x07.\r\n\n\x1b[1m  Next\u00a0 line \x85Third")
    assert out == ["Café olé is good.", "[1m Next line", "Third"]
    assert all(unicodedata.is_normalized("NFC", line) for line in out)


def test_invalid_utf8_is_replaced_visibly() -> None:
    text, invalid = decode_utf8(b"Price \xa315 paid.")
    assert invalid and text == "Price \ufffd15 paid."
    assert decode_utf8("Prix 15 €".encode()) == ("Prix 15 €", False)
    doc = process_document(text + " Second sentence here.", "plain", "en", 2)
    assert doc["sentences"][0] == "Price \ufffd15 paid."


@pytest.mark.parametrize("language", ["zh", "ja", "en"])
def test_cjk_sentence_splitting(language: str) -> None:
    assert split_sentences("这是第一句。这是第二句！第三句？结束", language) == [
        "这是第一句。", "这是第二句！", "第三句？", "结束"]
    # a closing quote stays with the sentence it ends
    quoted = split_sentences("「行くよ。」と彼は言った。次の文です。", language)
    assert quoted[0] == "「行くよ。」" and quoted[-1] == "次の文です。"


def test_english_sentence_splitting() -> None:
    assert split_sentences("Dr. Smith went to Washington. He arrived at 3.30 p.m. on Monday! Why?", "en") == [
        "Dr. Smith went to Washington.", "He arrived at 3.30 p.m. on Monday!", "Why?"]


def test_split_by_hash_is_stable_and_proportional() -> None:
    ids = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(20_000)]
    share = sum(is_validation(i, 0.2) for i in ids) / len(ids)
    assert abs(share - 0.2) < 0.01
    assert [is_validation(i, 0.2) for i in ids[:100]] == [is_validation(i, 0.2) for i in ids[:100]]
    assert not any(is_validation(i, 0.0) for i in ids)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def corpus_config(make_config, tmp_path: Path):
    """corpus_config([{"path": ...}], "corpus.x=y") -> a config reading those sources, cache in tmp."""

    def _make(sources: list[dict], *overrides: str, num_proc: int = 1):
        return make_config(f"corpus.sources={json.dumps(sources)}", f"run.cache_dir={tmp_path / 'cache'}",
                           f"run.num_proc={num_proc}", *overrides)

    return _make


def doc_text(i: int, sentences: int = 3) -> str:
    return " ".join(f"Document {i} says thing number {j}." for j in range(sentences))


def write_txt(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def load(record, split: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(record.dir / split))


def test_stage_output_layout_schema_and_counts(corpus_config, workdir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    write_txt(folder / "a.txt", [doc_text(i) for i in range(30)])
    (folder / "b.jsonl").write_text(
        json.dumps({"title": "Jay", "text": "A jsonl doc. With two sentences."}) + "\n", encoding="utf-8")
    (folder / "README.md").write_text("not read\n", encoding="utf-8")
    bad = write_txt(tmp_path / "bad.txt", ["Cost @5 was high. Fine.", "Other doc. Two."])
    bad.write_bytes(bad.read_bytes().replace(b"@", b"\xa3"))  # a Latin-1 pound sign: invalid UTF-8
    cfg = corpus_config([{"path": str(folder)}, {"path": str(bad)}], "corpus.validation_fraction=0.2")
    rec = run_stage(SPECS["corpus"], cfg, workdir, upstream={})

    assert sorted(p.name for p in rec.dir.iterdir()) == [
        "manifest.json", "sample.txt", "stats.json", "train", "validation"]
    assert not list(rec.dir.rglob("cache-*")) and not (workdir / ".partial").exists()
    train, validation = load(rec, "train"), load(rec, "validation")
    assert train.column_names == ["id", "source", "title", "sentences"]
    assert train.features == validation.features
    assert str(train.features["sentences"]) == "List(Value('string'))"
    counts = rec.manifest["counts"]
    assert counts["documents_train"] == len(train) and counts["documents_validation"] == len(validation)
    assert len(train) + len(validation) == 33 and 0 < len(validation) < 15
    assert counts["documents_with_invalid_utf8"] == 1 and counts["files_skipped"] == 1
    assert counts["sentences"] == 30 * 3 + 2 + 2 + 2
    assert counts["characters"] == sum(len(s) for ds in (train, validation) for d in ds for s in d["sentences"])
    bad_docs = [d["sentences"] for ds in (train, validation) for d in ds if d["source"] == "bad.txt"]
    assert ["Cost \ufffd5 was high.", "Fine."] in bad_docs
    jay = [d for ds in (train, validation) for d in ds if d["title"] == "Jay"]
    assert jay[0]["id"] == hashlib.sha1(b"A jsonl doc. With two sentences.").hexdigest()
    assert all(is_validation(i, 0.2) for i in validation["id"]) and not any(is_validation(i, 0.2) for i in train["id"])

    per_source = rec.manifest["details"]["per_source"]
    assert per_source["texts"]["documents"] == 31 and per_source["bad.txt"]["documents_with_invalid_utf8"] == 1
    assert json.loads((rec.dir / "stats.json").read_text())["per_source"] == per_source
    assert "# (no title)  [source: texts" in (rec.dir / "sample.txt").read_text(encoding="utf-8")
    assert [i["kind"] for i in rec.manifest["inputs"]] == ["path", "path"]
    assert all(len(i["fingerprint"]) == 64 for i in rec.manifest["inputs"])
    assert not (tmp_path / "cache").exists()  # local sources need no download cache


def test_dedupe_filters_and_caps(corpus_config, workdir: Path, tmp_path: Path) -> None:
    cafe = "Caf\u00e9 opens at noon. Everyone comes."
    first = write_txt(tmp_path / "one" / "first.txt", [cafe, doc_text(1), "Only one sentence here.", "Yes. B"])
    # the same document again, decomposed (e + combining accent) and with other whitespace: a duplicate
    decomposed = unicodedata.normalize("NFD", cafe).replace(" ", " \t ")
    second = write_txt(tmp_path / "two" / "second.txt", [decomposed, doc_text(2)])
    sources = [{"path": str(first)}, {"path": str(second)}]
    rec = run_stage(SPECS["corpus"], corpus_config(sources, "corpus.min_sentence_chars=3"), workdir, upstream={})
    stats = rec.manifest["details"]["per_source"]
    assert stats["first.txt"]["documents_read"] == 4 and stats["first.txt"]["documents_too_short"] == 2
    assert stats["first.txt"]["short_sentences_dropped"] == 1  # "B"
    assert stats["second.txt"]["duplicates_dropped"] == 1 and stats["second.txt"]["documents"] == 1
    kept = {d["id"]: d["source"] for s in ("train", "validation") for d in load(rec, s)}
    assert kept[hashlib.sha1(cafe.encode()).hexdigest()] == "first.txt"  # the first occurrence wins
    assert sorted(kept.values()) == ["first.txt", "first.txt", "second.txt"]

    capped = run_stage(SPECS["corpus"], corpus_config([{"path": str(first), "max_documents": 1}, {"path": str(second)}],
                                            "corpus.max_documents=2"), workdir, upstream={})
    stats = capped.manifest["details"]["per_source"]
    assert stats["first.txt"]["documents_read"] == 1  # per-source cap: documents read
    assert stats["second.txt"]["duplicates_dropped"] == 1 and stats["second.txt"]["documents"] == 1
    assert capped.manifest["counts"]["documents_over_cap"] == 0
    over = run_stage(SPECS["corpus"], corpus_config(sources, "corpus.max_documents=1"), workdir, upstream={})
    assert over.manifest["counts"]["documents_over_cap"] == 2  # corpus cap: after dedupe


def test_empty_corpus_fails_cleanly(corpus_config, workdir: Path, tmp_path: Path) -> None:
    f = write_txt(tmp_path / "short.txt", ["Just one sentence.", "Another single one."])
    with pytest.raises(StageError) as err:
        run_stage(SPECS["corpus"], corpus_config([{"path": str(f)}]), workdir, upstream={})
    msg = str(err.value)
    assert msg.startswith("corpus is empty after normalisation: 2 documents read from short.txt (2)")
    assert "fewer than corpus.min_document_sentences=2" in msg and "lower corpus.min_document_sentences" in msg
    assert not (workdir / "corpus").exists()


def test_deterministic_any_num_proc_and_local_edits_recompute(corpus_config, tmp_path: Path) -> None:
    f = write_txt(tmp_path / "many.txt", [doc_text(i, 2 + i % 3) for i in range(300)])
    one = run_stage(SPECS["corpus"], corpus_config([{"path": str(f)}]), tmp_path / "w1", upstream={})
    two = run_stage(SPECS["corpus"], corpus_config([{"path": str(f)}], num_proc=2), tmp_path / "w2", upstream={})
    assert one.fingerprint == two.fingerprint and one.manifest["files"] == two.manifest["files"]
    again = run_stage(SPECS["corpus"], corpus_config([{"path": str(f)}]), tmp_path / "w1", upstream={})
    assert again.cached
    write_txt(f, [doc_text(i) for i in range(5)])
    edited = run_stage(SPECS["corpus"], corpus_config([{"path": str(f)}]), tmp_path / "w1", upstream={})
    assert not edited.cached and "local_inputs" in edited.reason
    assert edited.manifest["counts"]["documents_train"] + edited.manifest["counts"]["documents_validation"] == 5
    # a document keeps its split whatever else is in the corpus
    split_of = {d["id"]: s for s in ("train", "validation") for d in load(one, s)}
    for s in ("train", "validation"):
        assert all(split_of[i] == s for i in load(edited, s)["id"])


def test_wiki_dump_through_the_stage(corpus_config, workdir: Path, tmp_path: Path) -> None:
    article = ("{{Infobox|x=1}}'''Ada''' was a [[mathematician|writer]].<ref>cite</ref> She wrote notes.\n"
               "== Life ==\nShe lived in [[London]]. [[Category:People]]")
    esc = article.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><page><title>Ada</title><ns>0</ns>'
           f'<revision><text>{esc}</text></revision></page></mediawiki>')
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    rec = run_stage(SPECS["corpus"], corpus_config([{"path": str(dump)}], "corpus.validation_fraction=0"), workdir, {})
    assert load(rec, "train")[0] | {"id": ""} == {
        "id": "", "source": "dump.xml.bz2", "title": "Ada",
        "sentences": ["Ada was a writer.", "She wrote notes.", "She lived in London."]}
    assert len(load(rec, "validation")) == 0


def test_reader_errors_reach_the_user(corpus_config, workdir: Path) -> None:
    with pytest.raises(StageError, match="Hugging Face dataset 'someone/corpus'"):
        run_stage(SPECS["corpus"], corpus_config([{"hf": "someone/corpus"}]), workdir, upstream={})
    assert not (workdir / "corpus").exists()


def test_embedded_sources_read_alike_after_a_config_round_trip(make_config) -> None:
    """The flow re-validates the dumped configuration (and config.yaml is reloaded by users): an
    embedded source must still be read with its own format and document rules, not the defaults."""
    from tasks.config import validate_config
    from tasks.sources import resolve_source

    cfg = make_config()
    again = validate_config(cfg.model_dump(mode="json"))
    cache = cfg.run.resolved_cache_dir()
    for i, (a, b) in enumerate(zip(cfg.corpus.sources, again.corpus.sources, strict=True)):
        ra, rb = resolve_source(a, i, cache), resolve_source(b, i, cache)
        assert (ra.format, ra.options) == (rb.format, rb.options)
    wiki = resolve_source(again.corpus.sources[0], 0, cache)
    bbc = resolve_source(again.corpus.sources[1], 1, cache)
    assert wiki.format == "wikixml" and bbc.options["txt_documents"] == "file"
