"""Pairs stage: storage, layout, both sentence-pair tasks, masking statistics, determinism, resuming, errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from helpers import synthetic_corpus, synthetic_documents, write_corpus
from transformers import AutoTokenizer

from tasks.config import load_config
from tasks.pairs import build, outputs
from tasks.pairs.instances import fit_lengths, tokenize_chunk
from tasks.pairs.masking import IGNORE_INDEX
from tasks.pairs.shards import run_shard
from tasks.pipeline import SPECS
from tasks.shards import run_local
from tasks.stage import StageError, StageRecord, run_stage

MAX_LEN = 32
SETTINGS = ("run.progress=false", f"pairs.max_seq_len={MAX_LEN}", "pairs.dupe_factor=2",
            "tokenizer.vocab_size=800")


def rows_of(pairs_dir: Path, split: str = "train") -> list[dict]:
    """Every row of a split, its arrays as lists."""
    ds = outputs.load_split(pairs_dir, split)
    return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ds[i].items()} for i in range(len(ds))]


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
    rows = rows_of(rec.dir)
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


def find_in(needle: np.ndarray, haystack: list[int], start: int = 0) -> int:
    """Where `needle` starts in `haystack` (at `start` or later), as a run of consecutive tokens; -1 if not."""
    n = len(needle)
    return next((i for i in range(start, len(haystack) - n + 1) if haystack[i:i + n] == needle.tolist()), -1)


def in_order_in(first: np.ndarray, second: np.ndarray, doc: list[int]) -> bool:
    """Both segments are runs of the document, the second after the first (truncation may skip tokens
    between them)."""
    at = find_in(first, doc)
    return at >= 0 and find_in(second, doc, at + len(first)) >= 0


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_storage_is_compact_and_files_are_listed(built):
    rec, _, rows, _ = built
    for split in ("train", "validation"):
        info = outputs.load_split(rec.dir, split).info
        assert (info["format"], info["version"]) == (outputs.FORMAT, outputs.FORMAT_VERSION)
        shard = np.load(rec.dir / split / info["shards"][0]["dir"] / "tokens.npy", mmap_mode="r")
        assert shard.dtype == np.uint16  # an 800-token vocabulary
        for name in ("offsets", "label_offsets"):  # no 2^31 limit
            assert np.load(rec.dir / split / info["shards"][0]["dir"] / f"{name}.npy").dtype == np.int64
    # Sparse labels and B stored once: a few bytes per token, where the dense columns of both views took ~20.
    stored = sum(f.stat().st_size for f in (rec.dir / "train").rglob("*.npy"))
    counts = rec.manifest["counts"]
    assert stored / counts["tokens_train"] < 6 and counts["bytes_per_token"] < 6
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
            assert in_order_in(a, b, docs[r["doc_index"]])  # B' is text after A in A's document
        else:
            assert r["nsp_b_doc_index"] != r["doc_index"]
            assert find_in(a, docs[r["doc_index"]]) >= 0 and find_in(b, docs[r["nsp_b_doc_index"]]) >= 0


def test_sop_balance_and_consecutive_segments(built):
    _, tok, rows, docs = built
    swapped = sum(r["sentence_order_label"] for r in rows)
    assert within_binomial(swapped, len(rows), 0.5)
    sep = tok.sep_token_id
    for r in rows:
        first, second = segments(originals(r["sop_input_ids"], r["sop_labels"]), sep)
        a, b = (second, first) if r["sentence_order_label"] else (first, second)
        assert in_order_in(a, b, docs[r["doc_index"]])  # never crosses documents
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
    rows = rows_of(rec.dir)
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
    _, one = run_both(tmp_path / "a", corpus, "run.num_proc=1", "pairs.chunk_documents=100")
    _, two = run_both(tmp_path / "b", corpus, "run.num_proc=2", "pairs.chunk_documents=100")
    assert len(outputs.load_split(one.dir, "train").info["shards"]) == 3  # 300 documents: two workers had work
    assert one.fingerprint == two.fingerprint  # byte-identical files: same seed, 1 or 2 workers
    _, other = run_both(tmp_path / "c", corpus, "run.num_proc=1", "pairs.chunk_documents=100", "run.seed=7")
    assert other.fingerprint != one.fingerprint


def test_fit_lengths_matches_token_by_token_truncation():
    def reference(la, lb, max_tokens):  # Google's truncate_seq_pair, lengths only
        while la + lb > max_tokens:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb

    la, lb = np.meshgrid(np.arange(1, 40), np.arange(1, 40))
    fa, fb = fit_lengths(la.ravel(), lb.ravel(), 29)
    assert [(int(x), int(y)) for x, y in zip(fa, fb, strict=True)] == \
        [reference(int(x), int(y), 29) for x, y in zip(la.ravel(), lb.ravel(), strict=True)]


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


def test_sop_view_has_no_truncation_order_cue(built):
    """Whether segment 1 ends a sentence must not tell the order: a rule that answers "original order"
    exactly when it does is at chance. (With truncate_seq_pair's random-end trims it got 0.553 here.)"""
    _, tok, rows, _ = built
    ends = {tok.convert_tokens_to_ids(t) for t in ".!?"}
    sep = tok.sep_token_id
    right = 0
    for r in rows:
        first, _ = segments(originals(r["sop_input_ids"], r["sop_labels"]), sep, np.array(r["sop_input_ids"]))
        right += int((int(first[-1]) in ends) == (r["sentence_order_label"] == 0))
    n = len(rows)
    half_width = 1.96 * math.sqrt(0.25 / n)
    assert abs(right / n - 0.5) <= 2 * half_width, f"boundary rule accuracy {right / n:.3f} over {n} pairs"


def test_chunk_tokens_are_the_tokenizers(built):
    _, tok, _, _ = built
    sentences = [["Hello world.", "", "A second one!"], ["Solo."]]
    chunk = tokenize_chunk(sentences, tok.backend_tokenizer)
    expected = [tok(s, add_special_tokens=False)["input_ids"] for s in ("Hello world.", "A second one!", "Solo.")]
    assert chunk.document_offsets.tolist() == [0, 2, 3]  # the empty sentence is dropped
    assert [chunk.tokens[a:b].tolist() for a, b in zip(chunk.sentence_offsets[:-1], chunk.sentence_offsets[1:],
                                                        strict=True)] == expected


def test_finished_shards_are_kept_when_the_stage_resumes(corpus, tmp_path):
    """A rerun after an interruption builds only the missing shards; they come out byte-identical."""
    cfg, _ = load_config("smoke", overrides=[*SETTINGS, "pairs.chunk_documents=100"])
    tok_rec = run_stage(SPECS["tokenizer"], cfg, tmp_path, {"corpus": corpus})
    tok = AutoTokenizer.from_pretrained(tok_rec.dir)
    jobs = build.split_jobs(corpus.dir, "train", 300, cfg, tmp_path / "out")
    jobs[0].out_dir.mkdir(parents=True)
    recipe = build.recipe(tok, cfg)
    first = run_local(run_shard, jobs, recipe, 1)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in jobs[1].out_dir.rglob("*.npy")}
    shutil.rmtree(jobs[1].folder)  # as if killed before shard 1 was renamed into place
    assert run_local(run_shard, jobs, recipe, 1) == first
    for p, (inode, mtime, data) in files.items():
        assert p.read_bytes() == data
        kept = p.parent != jobs[1].folder
        assert ((p.stat().st_ino, p.stat().st_mtime_ns) == (inode, mtime)) == kept


def test_token_counts_are_the_nsp_views_tokens_with_the_masks_undone(tmp_path):
    """PairsSplit.token_counts (dynamic masking's frequencies) against the rows themselves: the NSP view's
    tokens with every label put back, [CLS] and [SEP] left out; a random B''s stored B is not counted."""
    from helpers import write_pairs

    cls_id, sep_id, mask_id, vocab = 2, 3, 4, 40
    write_pairs(tmp_path / "train", 60, 0, vocab, cls_id, sep_id, mask_id)
    ds = outputs.load_split(tmp_path, "train")
    want = np.zeros(vocab, dtype=np.int64)
    for i in range(len(ds)):
        row = ds[i]
        original = np.where(row["labels"] != IGNORE_INDEX, row["labels"], row["input_ids"])
        np.add.at(want, original[(original != cls_id) & (original != sep_id)], 1)
    got = ds.token_counts()
    assert got[mask_id] == 0 and want.sum() > 0
    assert np.array_equal(np.pad(got, (0, vocab - len(got))), want)
