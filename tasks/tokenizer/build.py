"""Tokenizer stage: train a BERT WordPiece vocabulary on the corpus, or copy a pretrained teacher's.

The output folder loads with `transformers.AutoTokenizer.from_pretrained(dir)` as a fast BERT
tokenizer (input_ids, token_type_ids, attention_mask; [PAD]=0) and also holds a plain vocab.txt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from tasks.config import PipelineConfig
from tasks.corpus.outputs import load_split
from tasks.sources import resolve_teacher_source
from tasks.stage import StageContext, StageError, StageReport
from tasks.tokenizer.config import TokenizerConfig

# [PAD] first so that its id is 0, which padding code and the models' configs assume.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
BATCH_SIZE = 1000  # documents per batch read from Arrow while streaming sentences
# The train split's [UNK] rate is measured on its first sentences: 20k sentences are about 500k tokens,
# which puts a 0.5% rate within +-0.02 points (95%). 200k (about 5.6 M tokens encoded again) came with
# the stage at 0.63x the speed of commit 07c2c98 on 10 M tokens (benchmarks/scale.py).
UNK_SAMPLE_SENTENCES = 20_000


def iter_sentence_batches(ds: Dataset) -> Iterator[list[str]]:
    """Sentences of a corpus split, one list per batch of documents, read lazily from Arrow."""
    for batch in ds.select_columns(["sentences"]).iter(batch_size=BATCH_SIZE):
        yield [s for doc in batch["sentences"] for s in doc]


def count_sentences(ds: Dataset) -> int:
    return int(pc.sum(pc.list_value_length(ds.data.table.column("sentences"))).as_py() or 0)


def _bert_pipeline(model: models.WordPiece, tcfg: TokenizerConfig) -> Tokenizer:
    tk = Tokenizer(model)
    tk.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=tcfg.split_cjk_chars,
        strip_accents=tcfg.strip_accents,  # None: strip when lowercasing, BERT's rule
        lowercase=tcfg.lowercase,
    )
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tk


def _trainer(tcfg: TokenizerConfig, vocab_size: int, special: list[str], progress: bool,
             limit_alphabet: int | None) -> trainers.WordPieceTrainer:
    cap = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}  # unset: no cap
    return trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=tcfg.min_frequency, special_tokens=special,
                                     show_progress=progress, **cap)


def train_wordpiece(make_batches: Callable[[], Iterator[list[str]]], tcfg: TokenizerConfig,
                    progress: bool = False) -> Tokenizer:
    """A BERT WordPiece tokenizer (normaliser, pre-tokeniser, pair template, decoder) trained on the
    sentence batches that `make_batches()` yields; the same text always gives the same vocabulary.

    tokenizers 0.23 numbers the "##x" continuation pieces in hash-map order, and merges tied on count
    are then chosen by those numbers, so the vocabulary changes from run to run
    (huggingface/tokenizers#1794). A first pass with no merges lists the pieces; the real pass gets
    them up front, in sorted order, as fixed tokens, which makes every id and tie-break reproducible.
    """
    alphabet = tcfg.limit_alphabet  # None: every character the corpus uses
    probe = _bert_pipeline(models.WordPiece(unk_token="[UNK]"), tcfg)
    probe.train_from_iterator(make_batches(), _trainer(tcfg, 1, SPECIAL_TOKENS, False, alphabet))
    pieces = sorted(t for t in probe.get_vocab() if t.startswith("##"))
    trained = _bert_pipeline(models.WordPiece(unk_token="[UNK]"), tcfg)
    trained.train_from_iterator(make_batches(),
                                _trainer(tcfg, tcfg.vocab_size, SPECIAL_TOKENS + pieces, progress, alphabet))
    # The trainer registered the pieces as special tokens of `trained`; rebuild from the vocabulary
    # alone so that only the five BERT tokens are special.
    tk = _bert_pipeline(models.WordPiece(trained.get_vocab(), unk_token="[UNK]"), tcfg)
    tk.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tk.decoder = decoders.WordPiece(prefix="##")
    return tk


def save_bert_tokenizer(tk: Tokenizer, tcfg: TokenizerConfig, out_dir: Path) -> PreTrainedTokenizerBase:
    """Wrap as BertTokenizerFast (its config records the normaliser flags) and save it with a vocab.txt."""
    fast = BertTokenizerFast(
        tokenizer_object=tk,
        do_lower_case=tcfg.lowercase,
        strip_accents=tcfg.strip_accents,
        tokenize_chinese_chars=tcfg.split_cjk_chars,
        model_input_names=MODEL_INPUT_NAMES,
    )
    fast.save_pretrained(out_dir)
    write_vocab_txt(fast, out_dir)
    return fast


def write_vocab_txt(tok: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """vocab.txt, one token per line in id order: transformers 5 writes only tokenizer.json for a fast
    tokenizer, and other BERT tooling (and people) read vocab.txt."""
    vocab = tok.get_vocab()
    by_id = sorted(vocab, key=vocab.__getitem__)
    (out_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in by_id), encoding="utf-8")


def measure_on_sentences(tok: PreTrainedTokenizerBase, batches: Iterator[list[str]],
                         max_sentences: int | None = None) -> dict[str, float]:
    """Fertility (tokens per word) and [UNK] rate. A word is what BERT's pre-tokeniser yields: text
    between spaces and punctuation, and each CJK character when CJK splitting is on. With max_sentences:
    over the first that many sentences only."""
    backend = tok.backend_tokenizer
    unk_id = tok.unk_token_id
    tokens = words = unks = seen = 0
    for batch in batches:
        if max_sentences is not None:
            if seen >= max_sentences:
                break
            batch = batch[: max_sentences - seen]
        seen += len(batch)
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            tokens += len(enc.ids)
            unks += enc.ids.count(unk_id)
            words += len({w for w in enc.word_ids if w is not None})
    return {
        "validation_tokens": tokens,
        "fertility": round(tokens / words, 4) if words else 0.0,
        "unk_rate": round(unks / tokens, 6) if tokens else 0.0,
    }


def unk_warning(split: str, rate: float, limit: float) -> str:
    return (f"tokenizer: {rate:.2%} of the {split} split's tokens are [UNK] (over tokenizer.max_unk_rate = {limit:.2%}): "
            "characters missing from the vocabulary; leave tokenizer.limit_alphabet unset (every character seen "
            "min_frequency times is kept), lower tokenizer.min_frequency or raise tokenizer.vocab_size; a pretrained "
            "teacher's tokenizer may simply not cover this language")


def copy_pretrained(source: str, out_dir: Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"could not load the tokenizer of teacher.pretrained = {source!r}: {exc}. Point it at a folder "
            "holding a BERT checkpoint's tokenizer files (tokenizer.json or vocab.txt), or unset it to "
            "train a tokenizer here"
        ) from exc
    # A checkpoint's tokenizer.json may fix padding and truncation (all-MiniLM-L6-v2: pad and cut at 128);
    # the pairs stage decides lengths itself, and measure_on_sentences would count the padding.
    if tok.is_fast:
        tok.backend_tokenizer.no_padding()
        tok.backend_tokenizer.no_truncation()
    tok.save_pretrained(out_dir)
    if not (out_dir / "vocab.txt").exists():
        write_vocab_txt(tok, out_dir)
    return tok


def build_tokenizer(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    corpus_dir = ctx.upstream_dir("corpus")
    train, validation = load_split(corpus_dir, "train"), load_split(corpus_dir, "validation")
    counts: dict[str, float] = {}
    if cfg.teacher.pretrained:
        src = resolve_teacher_source(cfg.teacher.pretrained, cfg.run.resolved_cache_dir())
        tok = copy_pretrained(src.location, ctx.out_dir)
        counts["trained"] = 0
        details = {"source": f"pretrained tokenizer of {cfg.teacher.pretrained} (not trained)",
                   "provenance": {k: v for k, v in src.provenance.items() if k != "members"}}
    else:
        if train is None:
            raise StageError(f"the corpus has no training documents ({corpus_dir / 'train'}); "
                             "check corpus.sources")
        tk = train_wordpiece(lambda: iter_sentence_batches(train), cfg.tokenizer, cfg.run.progress)
        tok = save_bert_tokenizer(tk, cfg.tokenizer, ctx.out_dir)
        counts.update(trained=1, training_sentences=count_sentences(train), requested_vocab_size=cfg.tokenizer.vocab_size)
        details = {"source": "WordPiece trained on the corpus train split"}
    counts["vocab_size"] = len(tok)
    if validation is not None:  # the pairs stage refuses a corpus without one; nothing to measure here
        counts.update(measure_on_sentences(tok, iter_sentence_batches(validation)))
        counts["unk_rate_validation"] = counts["unk_rate"]
    if train is not None:
        sample = measure_on_sentences(tok, iter_sentence_batches(train), UNK_SAMPLE_SENTENCES)
        counts["unk_rate_train"] = sample["unk_rate"]
        details["unk_rate_train_sentences"] = min(count_sentences(train), UNK_SAMPLE_SENTENCES)
    warnings = [unk_warning(split, counts[f"unk_rate_{split}"], cfg.tokenizer.max_unk_rate)
                for split in ("train", "validation") if counts.get(f"unk_rate_{split}", 0.0) > cfg.tokenizer.max_unk_rate]
    if warnings:
        details["warnings"] = warnings
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    artifacts = sorted(p.relative_to(ctx.out_dir).as_posix() for p in ctx.out_dir.rglob("*") if p.is_file())
    return StageReport(
        counts=counts,
        inputs=[{"stage": "corpus", "fingerprint": ctx.upstream["corpus"].fingerprint}],
        artifacts=artifacts,
        details=details,
    )


