"""Pairs stage: schema, layout, both sentence-pair tasks, masking statistics, determinism, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from helpers import synthetic_corpus, synthetic_documents, write_corpus
from transformers import AutoTokenizer

from tasks.config import load_config
from tasks.pairs.build import FEATURES, fit_lengths
from tasks.pairs.masking import IGNORE_INDEX
from tasks.pipeline import SPECS
from tasks.stage import StageError, StageRecord, run_stage

MAX_LEN = 32
SETTINGS = ("run.progress=false", f"pairs.max_seq_len={MAX_LEN}", "pairs.dupe_factor=2",
            "tokenizer.vocab_size=800")


def run_both(workdir: Path, corpus: StageRecord, *overrides: str) -> tuple[StageRecord, StageRecord]:
    cfg, _ = load_config("smoke", overrides=[*SETTINGS, *overrides])
    tok = run_stage(SPECS["tokenizer"], cfg, workdir, {"corpus": corpus})
    return tok, run_stage(SPECS["pairs"], cfg, workdir, {"corpus": corpus, "tokenizer": tok})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> StageRecord:
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_train=300, n_validation=60)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """(pairs record, tokenizer, train rows, tokenized train documents as flat token lists)."""
    tok_rec, rec = run_both(tmp_path_factory.mktemp("work"), corpus)
    tok = AutoTokenizer.from_pretrained(tok_rec.dir)
    rows = load_from_disk(str(rec.dir / "train")).to_list()
    docs = [sum(tok(list(d), add_special_tokens=False)["input_ids"], [])
            for d in load_from_disk(str(corpus.dir / "train"))["sentences"]]
    return rec, tok, rows, docs


def originals(ids: list[int], labels: list[int]) -> np.ndarray:
    """The unmasked sequence: the label where a position is predicted, the input elsewhere."""
    ids, labels = np.array(ids), np.array(labels)
    return np.where(labels != IGNORE_INDEX, labels, ids)


def segments(seq: np.ndarray, sep: int, layout: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two segments of [CLS] x [SEP] y [SEP]; `layout`: the ids that locate [SEP] (for a label row)."""
    first_sep = int(np.flatnonzero((seq if layout is None else layout) == sep)[0])
    return seq[1:first_sep], seq[first_sep + 1:-1]


def contiguous_in(needle: np.ndarray, haystack: list[int]) -> bool:
    as_text = lambda xs: "," + ",".join(map(str, xs)) + ","  # noqa: E731 - commas keep 1 from matching 12
    return as_text(needle.tolist()) in as_text(haystack)


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_schema_dtypes_and_files(built):
    rec, _, rows, _ = built
    for split in ("train", "validation"):
        assert load_from_disk(str(rec.dir / split)).features == FEATURES
    assert FEATURES["input_ids"].feature.dtype == "int32" and FEATURES["token_type_ids"].feature.dtype == "int8"
    assert FEATURES["labels"].feature.dtype == "int32" and FEATURES["next_sentence_label"].dtype == "int8"
    assert "sentence_order_label" in (rec.dir / "SCHEMA.md").read_text()
    assert "[[" in (rec.dir / "sample.txt").read_text()
    counts = rec.manifest["counts"]
    assert counts["examples_train"] == len(rows) > 2000 and counts["examples_validation"] > 100
    assert rec.manifest["datasets"] == ["train", "validation"]
    assert rec.manifest["artifacts"] == ["SCHEMA.md", "sample.txt"]


def test_every_sequence_has_bert_layout(built):
    _, tok, rows, _ = built
    cls, sep = tok.cls_token_id, tok.sep_token_id
    for row in rows:
        for view in ("", "sop_"):
            ids = np.array(row[f"{view}input_ids"])
            assert len(ids) <= MAX_LEN and len(ids) == row["sop_length" if view else "length"]
            assert ids[0] == cls and ids[-1] == sep and (ids == sep).sum() == 2 and (ids == cls).sum() == 1
            first_sep = int(np.flatnonzero(ids == sep)[0])
            assert 1 < first_sep < len(ids) - 2  # both segments non-empty
            expected_types = [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
            assert row[f"{view}token_type_ids"] == expected_types
            assert row[f"{view}attention_mask"] == [1] * len(ids)


def test_nsp_balance_and_next_segment_invariant(built):
    _, tok, rows, docs = built
    randoms = sum(r["next_sentence_label"] for r in rows)
    assert within_binomial(randoms, len(rows), 0.5)
    for r in rows:
        a, b = segments(originals(r["input_ids"], r["labels"]), tok.sep_token_id)
        if r["next_sentence_label"] == 0:
            assert r["nsp_b_doc_index"] == r["doc_index"]
            assert contiguous_in(np.concatenate([a, b]), docs[r["doc_index"]])  # B' follows A exactly
        else:
            assert r["nsp_b_doc_index"] != r["doc_index"]
            assert contiguous_in(a, docs[r["doc_index"]]) and contiguous_in(b, docs[r["nsp_b_doc_index"]])


def test_sop_balance_and_consecutive_segments(built):
    _, tok, rows, docs = built
    swapped = sum(r["sentence_order_label"] for r in rows)
    assert within_binomial(swapped, len(rows), 0.5)
    sep = tok.sep_token_id
    for r in rows:
        first, second = segments(originals(r["sop_input_ids"], r["sop_labels"]), sep)
        a, b = (second, first) if r["sentence_order_label"] else (first, second)
        assert contiguous_in(np.concatenate([a, b]), docs[r["doc_index"]])  # never crosses documents
        # A (inputs and labels, so its masking too) is the same in both views; so is B when B' = B.
        nsp_ids, nsp_lab = (segments(np.array(r[k]), sep, np.array(r["input_ids"])) for k in ("input_ids", "labels"))
        sop_ids, sop_lab = (segments(np.array(r[k]), sep, np.array(r["sop_input_ids"]))
                            for k in ("sop_input_ids", "sop_labels"))
        a_at = 1 if r["sentence_order_label"] else 0
        assert np.array_equal(nsp_ids[0], sop_ids[a_at]) and np.array_equal(nsp_lab[0], sop_lab[a_at])
        if r["next_sentence_label"] == 0:
            assert np.array_equal(nsp_ids[1], sop_ids[1 - a_at]) and np.array_equal(nsp_lab[1], sop_lab[1 - a_at])


def test_masking_rates_and_labels(built):
    _, tok, rows, _ = built
    special = set(tok.all_special_ids)
    cfg, _ = load_config("smoke", overrides=list(SETTINGS))
    budget_cap = cfg.pairs.resolved_max_predictions()
    predicted = non_special = as_mask = unchanged = 0
    for r in rows:
        for view in ("", "sop_"):
            ids, labels = np.array(r[f"{view}input_ids"]), np.array(r[f"{view}labels"])
            is_special = np.isin(ids, [tok.cls_token_id, tok.sep_token_id])
            at = labels != IGNORE_INDEX
            assert not (at & is_special).any()  # specials are never predicted
            assert is_special.sum() == 3
            # Elsewhere only ordinary tokens or [MASK]: a random replacement is never a special token.
            assert not np.isin(ids[~is_special], list(special - {tok.mask_token_id})).any()
            assert not np.isin(labels[at], list(special)).any()  # a label is an original (non-special) token
            assert 1 <= at.sum() <= budget_cap
            if view == "":
                predicted += int(at.sum())
                non_special += int((~is_special).sum())
                as_mask += int((ids[at] == tok.mask_token_id).sum())
                unchanged += int((ids[at] == labels[at]).sum())
    # Per-sequence rounding of the budget (round(29 * 0.15) = 4) keeps short sequences a bit under 15%.
    assert 0.13 <= predicted / non_special <= 0.16
    assert within_binomial(as_mask, predicted, 0.8)
    # "unchanged" also counts the rare random replacement that drew the original token.
    assert within_binomial(unchanged, predicted, 0.1 + 0.1 / len(tok), sigmas=5)


def test_dupe_copies_have_different_masks_and_boundaries(built):
    _, _, rows, _ = built
    restart = next(i for i in range(1, len(rows)) if rows[i]["doc_index"] < rows[i - 1]["doc_index"])
    copies = rows[:restart], rows[restart:]
    first_of = [{r["doc_index"]: r for r in reversed(c)} for c in copies]
    docs = sorted(set(first_of[0]) & set(first_of[1]))
    assert len(docs) > 250
    differ = sum(first_of[0][d]["labels"] != first_of[1][d]["labels"] for d in docs)
    assert differ / len(docs) > 0.9
    assert [r["length"] for r in copies[0]] != [r["length"] for r in copies[1]]


def test_whole_word_masking_masks_whole_words(corpus, tmp_path):
    tok_rec, rec = run_both(tmp_path, corpus, "pairs.whole_word_mask=true", "pairs.dupe_factor=1")
    tok = AutoTokenizer.from_pretrained(tok_rec.dir)
    is_piece = np.array([t.startswith("##") for t in tok.convert_ids_to_tokens(list(range(len(tok))))])
    rows = load_from_disk(str(rec.dir / "train")).to_list()
    pieces_masked = 0
    for r in rows:
        for view in ("", "sop_"):
            orig = originals(r[f"{view}input_ids"], r[f"{view}labels"])
            at = np.array(r[f"{view}labels"]) != IGNORE_INDEX
            # A "##" piece is predicted exactly when the token before it is (a segment may start mid-word).
            cont = np.flatnonzero(is_piece[orig[1:]] & ~np.isin(orig[:-1], [tok.cls_token_id, tok.sep_token_id])) + 1
            assert np.array_equal(at[cont], at[cont - 1])
            pieces_masked += int(at[cont].sum())
    assert pieces_masked > 100  # the check above really saw multi-piece words masked


def test_same_seed_identical_other_seed_differs_any_num_proc(corpus, tmp_path):
    _, one = run_both(tmp_path / "a", corpus, "run.num_proc=1")
    _, two = run_both(tmp_path / "b", corpus, "run.num_proc=2")
    assert one.fingerprint == two.fingerprint  # byte-identical files: same seed, 1 or 2 workers
    _, other = run_both(tmp_path / "c", corpus, "run.num_proc=1", "run.seed=7")
    assert other.fingerprint != one.fingerprint


def test_fit_lengths_matches_token_by_token_truncation():
    def reference(la, lb, max_tokens):  # Google's truncate_seq_pair, lengths only
        while la + lb > max_tokens:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb

    for la in range(1, 40):
        for lb in range(1, 40):
            assert fit_lengths(la, lb, 29) == reference(la, lb, 29)


def test_corpus_of_single_sentences_is_refused(tmp_path):
    single = dict(min_sentences=1, max_sentences=1)
    corpus = write_corpus(tmp_path / "corpus", synthetic_documents(50, 0, **single),
                          synthetic_documents(10, 1, **single))
    with pytest.raises(StageError, match="two or more sentences"):
        run_both(tmp_path / "work", corpus)
    assert not (tmp_path / "work" / "pairs").exists()


def test_empty_validation_split_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", synthetic_documents(50, 0), synthetic_documents(0, 1))
    with pytest.raises(StageError, match="validation_fraction"):
        run_both(tmp_path / "work", corpus)
    assert not (tmp_path / "work" / "pairs").exists()


def test_tokenized_split_streams_chunks_into_int64_offsets(tmp_path):
    """The flat view of a tokenized split is written one Arrow chunk at a time with int64 offsets (no 2^31
    limit, no whole-split copy in memory) and memory-mapped; it holds exactly the documents' sentences."""
    from datasets import Dataset, concatenate_datasets

    from tasks.pairs.build import TOKEN_FEATURES, TokenizedSplit

    rng = np.random.default_rng(0)
    docs = [[rng.integers(5, 100, size=int(rng.integers(1, 9))).tolist() for _ in range(int(rng.integers(0, 5)))]
            for _ in range(60)]
    parts = [Dataset.from_dict({"sentence_ids": docs[i:i + 20]}, features=TOKEN_FEATURES) for i in (0, 20, 40)]
    ds = concatenate_datasets(parts).select(range(5, 60))  # several chunks, and a sliced first one
    assert len(ds.data.table.column("sentence_ids").chunks) >= 2
    split = TokenizedSplit.from_dataset(ds, tmp_path / "flat")
    assert split.sentence_offsets.dtype == np.int64 and split.document_offsets.dtype == np.int64
    assert isinstance(split.tokens, np.memmap)
    assert split.n_documents == 55
    for d, doc in enumerate(docs[5:]):
        assert [s.tolist() for s in split.sentences(d)] == doc
