"""Tokenizer stage: a trained BERT WordPiece vocabulary, or a pretrained teacher's tokenizer copied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk
from helpers import synthetic_corpus
from transformers import AutoTokenizer

from tasks.pipeline import SPECS
from tasks.stage import StageError, StageRecord, run_stage


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> StageRecord:
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"), n_train=150, n_validation=30)


def build(make_config, workdir: Path, corpus: StageRecord, *overrides: str) -> StageRecord:
    return run_stage(SPECS["tokenizer"], make_config(*overrides), workdir, {"corpus": corpus})


def test_trained_vocabulary_loads_as_bert_tokenizer(make_config, workdir, corpus):
    rec = build(make_config, workdir, corpus, "tokenizer.vocab_size=600")
    tok = AutoTokenizer.from_pretrained(rec.dir)
    counts = rec.manifest["counts"]

    assert tok.is_fast and type(tok).__name__ == "BertTokenizer"
    assert 0.9 * 600 <= len(tok) <= 600 == counts["requested_vocab_size"]
    assert counts["vocab_size"] == len(tok) and counts["trained"] == 1
    assert counts["training_sentences"] == sum(len(d) for d in _split(corpus, "train")["sentences"])
    assert counts["fertility"] >= 1.0 and 0.0 <= counts["unk_rate"] < 0.01
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert ids == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 3, 4)
    vocab_lines = (rec.dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab_lines == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert set(rec.manifest["artifacts"]) >= {"tokenizer.json", "tokenizer_config.json", "vocab.txt"}

    enc = tok("the river city", "a church")
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"}
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens == ["[CLS]", "the", "river", "city", "[SEP]", "a", "church", "[SEP]"]
    assert enc["token_type_ids"] == [0] * 5 + [1] * 3


def test_training_is_reproducible(make_config, tmp_path, corpus):
    # tokenizers numbers "##" pieces in hash order; the stage must not let that change the vocabulary.
    a = build(make_config, tmp_path / "a", corpus, "tokenizer.vocab_size=600")
    b = build(make_config, tmp_path / "b", corpus, "tokenizer.vocab_size=600")
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    ("overrides", "text", "expected"),
    [
        ((), "Café", ["cafe"]),  # default: lowercase and strip accents, as BERT uncased
        (("tokenizer.lowercase=false",), "café", ["café"]),  # strip_accents None follows lowercase
        (("tokenizer.lowercase=true", "tokenizer.strip_accents=false"), "Café", ["café"]),
        ((), "東京大学", ["東", "京", "大", "学"]),  # each CJK character its own word
    ],
)
def test_normalisation_follows_config(make_config, workdir, corpus, overrides, text, expected):
    tok = AutoTokenizer.from_pretrained(build(make_config, workdir, corpus, *overrides).dir)
    assert tok.tokenize(text) == expected


def test_cjk_splitting_can_be_turned_off(make_config, workdir, corpus):
    tok = AutoTokenizer.from_pretrained(build(make_config, workdir, corpus, "tokenizer.split_cjk_chars=false").dir)
    pieces = tok.tokenize("東京大学")
    # One word: whatever the pieces, every one after the first continues it.
    assert len(pieces) < 4 and all(p.startswith("##") for p in pieces[1:])


def test_pretrained_tokenizer_replaces_training(make_config, tmp_path, corpus):
    source = build(make_config, tmp_path / "src", corpus, "tokenizer.vocab_size=300").dir
    teacher = tmp_path / "teacher"
    AutoTokenizer.from_pretrained(source).save_pretrained(teacher)

    rec = build(make_config, tmp_path / "run", corpus, f"teacher.pretrained={teacher}")
    counts = rec.manifest["counts"]
    assert counts["trained"] == 0 and "training_sentences" not in counts
    assert "pretrained" in rec.manifest["details"]["source"]
    copied = AutoTokenizer.from_pretrained(rec.dir)
    assert copied.get_vocab() == AutoTokenizer.from_pretrained(teacher).get_vocab()
    assert (rec.dir / "vocab.txt").is_file()


def test_a_pretrained_tokenizers_fixed_padding_is_not_copied(make_config, tmp_path, corpus):
    """all-MiniLM-L6-v2's tokenizer.json pads and truncates every text to 128 tokens; the copy must not
    (the fertility would count the padding), and must measure as the unpadded tokenizer does."""
    source = build(make_config, tmp_path / "src", corpus, "tokenizer.vocab_size=300").dir
    plain = build(make_config, tmp_path / "plain", corpus, f"teacher.pretrained={source}")
    teacher = tmp_path / "teacher"
    padded = AutoTokenizer.from_pretrained(source)
    padded.backend_tokenizer.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    padded.backend_tokenizer.enable_truncation(max_length=128)
    padded.save_pretrained(teacher)
    assert json.loads((teacher / "tokenizer.json").read_text())["padding"] is not None

    rec = build(make_config, tmp_path / "run", corpus, f"teacher.pretrained={teacher}")
    saved = json.loads((rec.dir / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    for key in ("fertility", "unk_rate", "validation_tokens"):
        assert rec.manifest["counts"][key] == plain.manifest["counts"][key], key


def test_missing_pretrained_tokenizer_is_a_clear_error(make_config, workdir, corpus, tmp_path):
    with pytest.raises(StageError, match="teacher.pretrained"):
        build(make_config, workdir, corpus, f"teacher.pretrained={tmp_path / 'nowhere'}")
    assert not (workdir / "tokenizer").exists()


def _split(corpus: StageRecord, name: str) -> Dataset:
    return load_from_disk(str(corpus.dir / name))


def _cjk_corpus(root: Path, distinct: int = 1500, seed: int = 0) -> StageRecord:
    """Sentences of CJK characters from a set of `distinct` ones (each used many times), Zipf-like, so
    the rarer ones fall outside a 1000-character alphabet."""
    import random

    from helpers import write_corpus

    rng = random.Random(seed)
    chars = [chr(0x4E00 + i) for i in range(distinct)]
    weights = [1.0 / (i + 1) ** 0.5 for i in range(distinct)]

    def split(n_docs: int, prefix: str) -> dict[str, list]:
        docs = [["".join(rng.choices(chars, weights, k=20)) + "。" for _ in range(8)] for _ in range(n_docs)]
        return {"id": [f"{prefix}{i}" for i in range(n_docs)], "source": ["zh"] * n_docs, "title": [""] * n_docs,
                "sentences": docs}

    return write_corpus(root, split(300, "train"), split(40, "val"))


def test_a_cjk_corpus_keeps_every_character_it_uses(make_config, tmp_path):
    """A Chinese-like corpus of 1,500 characters: the default alphabet keeps every character the corpus
    uses, so almost nothing is [UNK]; the old cap of 1,000 characters leaves the rare ones [UNK], which the
    manifest reports per split and the run summary warns about."""
    corpus = _cjk_corpus(tmp_path / "corpus")
    full = build(make_config, tmp_path / "w1", corpus, "tokenizer.vocab_size=4000")
    counts = full.manifest["counts"]
    assert counts["unk_rate_train"] < 0.001 and counts["unk_rate_validation"] < 0.005
    assert "warnings" not in full.manifest["details"]
    capped = build(make_config, tmp_path / "w2", corpus, "tokenizer.vocab_size=4000", "tokenizer.limit_alphabet=1000")
    counts = capped.manifest["counts"]
    assert counts["unk_rate_train"] > 0.005 and counts["unk_rate_validation"] > 0.005
    warnings = capped.manifest["details"]["warnings"]
    assert len(warnings) == 2 and "[UNK]" in warnings[0] and "tokenizer.limit_alphabet" in warnings[0]
