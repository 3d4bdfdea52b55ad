"""Stage `corpus`: every configured source -> clean, sentence-split, deduplicated documents.

Output (in the stage directory): Arrow datasets `train/` and `validation/` with columns
id (sha1 of the normalised text), source (the source's label), title ("" when none) and sentences
(list of strings); `stats.json` (per-source statistics) and `sample.txt` (a few documents to read).

Documents stream from the sources into an Arrow file (`Dataset.from_generator`); the per-document
work (markup removal, normalisation, sentence splitting) runs in `datasets.map` workers; filtering,
dedupe, the cap and the train/validation split are one pass over the small columns.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetInfo, Features, List, Value

from tasks.artifacts import atomic_write_json, atomic_write_text, sha256_json
from tasks.config import PipelineConfig
from tasks.corpus.config import corpus_key
from tasks.sources import ResolvedSource, iter_documents, resolve_source
from tasks.stage import StageContext, StageError, StageReport
from tasks.text import process_document

COLUMNS = ["id", "source", "title", "sentences"]
RAW_FEATURES = Features({"source": Value("string"), "title": Value("string"), "text": Value("string"),
                         "markup": Value("string"), "invalid_utf8": Value("bool")})
PROCESSED_FEATURES = Features({
    "id": Value("string"), "source": Value("string"), "title": Value("string"),
    "sentences": List(Value("string")), "num_sentences": Value("int32"), "characters": Value("int64"),
    "short_sentences_dropped": Value("int32"), "invalid_utf8": Value("bool"),
})
SAMPLE_DOCUMENTS = 3
SAMPLE_SENTENCES = 8
# Small batches: a Wikipedia article's markup is tens of KB, and the progress bar should move.
MAP_BATCH_SIZE = 64
# Per-source statistics, in the order stats.json shows them.
STAT_NAMES = ("documents", "sentences", "characters", "documents_read", "documents_with_invalid_utf8",
              "documents_too_short", "duplicates_dropped", "documents_over_cap", "short_sentences_dropped",
              "files_skipped")


def build_corpus(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    c = cfg.corpus
    cache_dir = cfg.run.resolved_cache_dir()
    sources = [resolve_source(spec, i, cache_dir, max_bad_share=c.max_bad_char_share) for i, spec in enumerate(c.sources)]
    _make_labels_unique(sources)
    # Intermediate datasets live in scratch only; their fingerprints just have to be stable names.
    run_fp = sha256_json({"key": corpus_key(cfg), "inputs": [s.describe() for s in sources]})[:32]

    with _datasets_progress(cfg.run.progress):
        raw = _read_sources(sources, ctx.scratch_dir, run_fp)
        processed = _clean_documents(raw, cfg, ctx, run_fp)
        splits, per_source = _select_documents(processed, sources, cfg, ctx)
        if not any(indices for indices, _ in splits.values()):
            raise StageError(_empty_corpus_message(per_source, sources, cfg))
        for split, (indices, ids_digest) in splits.items():
            _save_split(processed, split, indices, ids_digest, cfg, ctx)
        train_idx, validation_idx = splits["train"][0], splits["validation"][0]
        sample = processed.select((train_idx or validation_idx)[:SAMPLE_DOCUMENTS], keep_in_memory=True)

    totals = {name: sum(s[name] for s in per_source.values()) for name in STAT_NAMES}
    stats = {"totals": totals, "per_source": per_source,
             "train_documents": len(train_idx), "validation_documents": len(validation_idx)}
    atomic_write_json(ctx.out_dir / "stats.json", stats)
    atomic_write_text(ctx.out_dir / "sample.txt", _sample_text(sample))

    counts = {
        "documents_train": len(train_idx), "documents_validation": len(validation_idx),
        **{name: totals[name] for name in STAT_NAMES if name != "documents"},
        "sources": len(sources),
    }
    details: dict = {"per_source": per_source}
    warnings = corpus_warnings(per_source, sources, cfg)
    if warnings:
        details["warnings"] = warnings
    return StageReport(counts=counts, inputs=[s.describe() for s in sources], datasets=["train", "validation"],
                       artifacts=["stats.json", "sample.txt"], details=details)


def corpus_warnings(per_source: dict[str, dict[str, int]], sources: list[ResolvedSource],
                    cfg: PipelineConfig) -> list[str]:
    """What the run summary warns about: files skipped, and a source that lost more than
    corpus.max_dropped_share of its documents, with the reason and the fix."""
    out = []
    for src in sources:
        if src.skipped:
            shown = "; ".join(f"{Path(s['file']).name} ({s['reason']})" for s in src.skipped[:5])
            more = f" and {len(src.skipped) - 5} more" if len(src.skipped) > 5 else ""
            out.append(f"corpus: {src.label}: skipped {len(src.skipped)} file(s) that are not text: {shown}{more} "
                       "(listed in the corpus manifest's inputs)")
        stats = per_source[src.label]
        read = stats["documents_read"]
        short, dupes = stats["documents_too_short"], stats["duplicates_dropped"]
        if read and (short + dupes) / read > cfg.corpus.max_dropped_share:
            reason = (f"{short:,} had fewer than corpus.min_document_sentences = {cfg.corpus.min_document_sentences} "
                      "sentences" if short >= dupes else f"{dupes:,} were duplicates")
            fix = (f"group records into documents (corpus.sources[{src.index}].group_by: a field, or a number of "
                   "consecutive records) or lower corpus.min_document_sentences" if short >= dupes else
                   "check the source for repeated documents, or set corpus.dedupe: false")
            out.append(f"corpus: {src.label}: {short + dupes:,} of {read:,} documents ({(short + dupes) / read:.0%}) "
                       f"were dropped: {reason}. NSP and SOP need documents of several sentences: {fix}")
    return out


# ------------------------------------------------------------------------------------------------
def _make_labels_unique(sources: list[ResolvedSource]) -> None:
    """Two sources with the same label (two folders called `texts`) keep separate statistics."""
    seen: set[str] = set()
    for src in sources:
        if src.label in seen:
            src.label = f"{src.label}#{src.index}"
        seen.add(src.label)


def _raw_documents(sources: list[ResolvedSource]) -> Iterator[dict[str, Any]]:
    for src in sources:
        for doc in iter_documents(src):
            yield {"source": src.label, **doc}


def _read_sources(sources: list[ResolvedSource], scratch: Path, run_fp: str) -> Dataset:
    try:
        return Dataset.from_generator(_raw_documents, features=RAW_FEATURES, gen_kwargs={"sources": sources},
                                      cache_dir=str(scratch / "datasets"), fingerprint=f"{run_fp}-raw")
    except datasets.exceptions.DatasetGenerationError as exc:
        # A reader's own error (bad JSON line, missing field, hub offline) is the message to show.
        if isinstance(exc.__cause__, StageError):
            raise exc.__cause__ from None
        raise


def _clean_documents(raw: Dataset, cfg: PipelineConfig, ctx: StageContext, run_fp: str) -> Dataset:
    """Markup removal, normalisation and sentence splitting in parallel; rows stay in reading order."""
    workers = ctx.num_proc if ctx.num_proc > 1 and len(raw) > MAP_BATCH_SIZE else 1
    order = None
    if workers > 1:
        # datasets gives each worker a contiguous block of rows, and sources differ in cost (parsing
        # wiki markup is ~50x the work of plain text per character): striping the rows across the
        # workers balances them. The permutation is undone below.
        order = _striped_order(len(raw), workers)
        raw = raw.select(order, indices_cache_file_name=str(ctx.scratch_dir / "striped.arrow"),
                         new_fingerprint=f"{run_fp}-striped")
    processed = raw.map(
        _process_batch, batched=True, batch_size=MAP_BATCH_SIZE, num_proc=workers if workers > 1 else None,
        fn_kwargs={"language": cfg.corpus.language, "min_sentence_chars": cfg.corpus.min_sentence_chars},
        features=PROCESSED_FEATURES, remove_columns=["text", "markup"],
        cache_file_name=str(ctx.scratch_dir / "processed.arrow"), new_fingerprint=f"{run_fp}-processed",
        desc="corpus: cleaning and splitting documents",
    )
    # Re-wrapped (same Arrow table, no copy) so that the saved metadata does not depend on num_proc
    # (several workers leave split=None, one leaves "train") nor describe the intermediate dataset.
    processed = Dataset(processed.data, info=DatasetInfo(features=PROCESSED_FEATURES),
                        fingerprint=f"{run_fp}-processed")
    if order is None:
        return processed
    return processed.select(_inverse(order), new_fingerprint=f"{run_fp}-reading-order",
                            indices_cache_file_name=str(ctx.scratch_dir / "reading-order.arrow"))


def _striped_order(n: int, workers: int) -> list[int]:
    """Rows 0, w, 2w, ..., then 1, w+1, ...: each of the w contiguous blocks datasets hands out
    gets every w-th document."""
    return [i for k in range(workers) for i in range(k, n, workers)]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, row in enumerate(order):
        inverse[row] = position
    return inverse


def _process_batch(batch: dict[str, list], language: str, min_sentence_chars: int) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for text, markup in zip(batch["text"], batch["markup"], strict=True):
        doc = process_document(text, markup, language, min_sentence_chars)
        for key in ("id", "sentences", "characters", "short_sentences_dropped"):
            out[key].append(doc[key])
        out["num_sentences"].append(len(doc["sentences"]))
    return {**out, "source": batch["source"], "title": batch["title"], "invalid_utf8": batch["invalid_utf8"]}


def is_validation(doc_id: str, fraction: float) -> bool:
    """The split depends on the document alone, so it is stable when sources are added or removed."""
    return int(doc_id[:8], 16) / 2**32 < fraction


def _select_documents(processed: Dataset, sources: list[ResolvedSource], cfg: PipelineConfig,
                      ctx: StageContext) -> tuple[dict[str, tuple[list[int], str]], dict[str, dict[str, int]]]:
    """Filter, dedupe (first occurrence wins), cap and split, reading only the small columns.

    Returns {split: (row indices, sha256 of its ids in order)} and the per-source statistics."""
    c = cfg.corpus
    per_source = {s.label: dict.fromkeys(STAT_NAMES, 0) for s in sources}
    for s in sources:
        per_source[s.label]["files_skipped"] = s.files_skipped
    seen: set[str] = set()
    train: list[int] = []
    validation: list[int] = []
    digests = {"train": hashlib.sha256(), "validation": hashlib.sha256()}
    small = processed.select_columns(["id", "source", "num_sentences", "characters", "short_sentences_dropped",
                                      "invalid_utf8"])
    row = 0
    batches = small.iter(batch_size=10_000)
    for batch in ctx.progress(batches, "selecting documents", total=-(-len(small) // 10_000), unit="batch"):
        for doc_id, label, n_sentences, n_chars, short, invalid in zip(*batch.values(), strict=True):
            stats = per_source[label]
            stats["documents_read"] += 1
            stats["documents_with_invalid_utf8"] += invalid
            stats["short_sentences_dropped"] += short
            if n_sentences < c.min_document_sentences:
                stats["documents_too_short"] += 1
            elif c.dedupe and doc_id in seen:
                stats["duplicates_dropped"] += 1
            elif c.max_documents is not None and len(train) + len(validation) >= c.max_documents:
                stats["documents_over_cap"] += 1
            else:
                seen.add(doc_id)
                stats["documents"] += 1
                stats["sentences"] += n_sentences
                stats["characters"] += n_chars
                split = "validation" if is_validation(doc_id, c.validation_fraction) else "train"
                (validation if split == "validation" else train).append(row)
                digests[split].update(doc_id.encode())
            row += 1
    return {"train": (train, digests["train"].hexdigest()),
            "validation": (validation, digests["validation"].hexdigest())}, per_source


def _save_split(processed: Dataset, split: str, indices: list[int], ids_digest: str, cfg: PipelineConfig,
                ctx: StageContext) -> None:
    # The saved fingerprint comes from the content (ids in order) and the configuration, not from
    # where the inputs live, so two runs on the same input write byte-identical files.
    fp = sha256_json({"split": split, "ids": ids_digest, "corpus": cfg.section("corpus")})[:32]
    rows = processed.select(indices, indices_cache_file_name=str(ctx.scratch_dir / f"{split}-rows.arrow"),
                            new_fingerprint=f"{fp}-rows")
    # An empty split needs num_shards=1: datasets would write no shard at all, and then cannot load it
    # back (an empty validation split is normal with validation_fraction=0).
    rows.select_columns(COLUMNS, new_fingerprint=fp).save_to_disk(str(ctx.out_dir / split),
                                                                  num_shards=None if indices else 1)


def _empty_corpus_message(per_source: dict[str, dict[str, int]], sources: list[ResolvedSource],
                          cfg: PipelineConfig) -> str:
    read = sum(s["documents_read"] for s in per_source.values())
    where = ", ".join(f"{src.label} ({per_source[src.label]['documents_read']})" for src in sources)
    if read == 0:
        skipped = [f"{Path(f['file']).name} ({f['reason']})" for src in sources for f in src.skipped][:5]
        why = f"; skipped as not text: {', '.join(skipped)}" if skipped else ""
        return (f"corpus is empty: no documents were read from {where}{why}; check that the sources hold text in "
                "the expected format (corpus.sources[].format, text_field) or add sources")
    reasons = []
    for name, what in (("documents_too_short",
                        f"had fewer than corpus.min_document_sentences={cfg.corpus.min_document_sentences} "
                        f"sentences of at least corpus.min_sentence_chars={cfg.corpus.min_sentence_chars} "
                        "characters"),
                       ("duplicates_dropped", "were duplicates")):
        n = sum(s[name] for s in per_source.values())
        if n:
            reasons.append(f"{n} {what}")
    return (f"corpus is empty after normalisation: {read} documents read from {where}, all dropped because "
            f"{' and '.join(reasons)}; lower corpus.min_document_sentences, group one-sentence records into "
            "documents (corpus.sources[].group_by), or add sources")


def _sample_text(docs: Dataset) -> str:
    parts = []
    for doc in docs:
        shown = doc["sentences"][:SAMPLE_SENTENCES]
        more = len(doc["sentences"]) - len(shown)
        parts.append(f"# {doc['title'] or '(no title)'}  [source: {doc['source']}, id: {doc['id']}]\n"
                     + "\n".join(shown) + (f"\n... ({more} more sentences)" if more else "") + "\n")
    return "\n".join(parts)


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
