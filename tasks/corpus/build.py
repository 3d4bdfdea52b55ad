"""Stage `corpus`: every configured source -> clean, sentence-split, deduplicated documents.

Output (in the stage directory): Arrow datasets `train/` and `validation/` with columns
id (sha1 of the normalised text), source (the source's label), title ("" when none) and sentences
(list of strings); `stats.json` (per-source statistics) and `sample.txt` (a few documents to read).

Every step streams, so memory does not grow with the corpus:
- documents stream from the sources into one raw Arrow file (`Dataset.from_generator`, one process);
- the per-document work (markup removal, normalisation, sentence splitting) runs as shards of
  corpus.shard_documents raw rows (shards.py), in run.num_proc local workers or as Prefect tasks on a
  Dask cluster (run.task_runner: dask);
- filtering, de-duplication, the cap and the train/validation split run out of core (select.py);
- each split is saved from its pieces by datasets, file by file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetInfo, Features, concatenate_datasets, load_from_disk

from tasks.artifacts import atomic_write_json, atomic_write_text, sha256_json
from tasks.config import PipelineConfig
from tasks.corpus.config import corpus_key, output_section
from tasks.corpus.select import STAT_NAMES, select_documents
from tasks.corpus.shards import PROCESSED_FEATURES, CleanRecipe, clean_jobs, run_clean_shard
from tasks.sources import ResolvedSource, iter_documents, resolve_source
from tasks.stage import StageContext, StageError, StageReport

COLUMNS = ["id", "source", "title", "sentences"]
OUTPUT_FEATURES = Features({name: PROCESSED_FEATURES[name] for name in COLUMNS})
RAW_FEATURES = Features({"source": datasets.Value("string"), "title": datasets.Value("string"),
                         "text": datasets.Value("string"), "markup": datasets.Value("string"),
                         "invalid_utf8": datasets.Value("bool")})
SAMPLE_DOCUMENTS = 3
SAMPLE_SENTENCES = 8


def build_corpus(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    c = cfg.corpus
    cache_dir = cfg.run.resolved_cache_dir()
    sources = [resolve_source(spec, i, cache_dir, max_bad_share=c.max_bad_char_share) for i, spec in enumerate(c.sources)]
    _make_labels_unique(sources)
    # Intermediate datasets live in scratch only; their fingerprints just have to be stable names.
    run_fp = sha256_json({"key": corpus_key(cfg), "inputs": [s.describe() for s in sources]})[:32]

    with _datasets_progress(cfg.run.progress):
        raw = _read_sources(sources, ctx.scratch_dir, run_fp)
        cleaned = _clean_documents(raw, cfg, ctx)
    labels = [src.label for src in sources]
    sel = select_documents(cleaned, len(raw), labels, c, ctx.scratch_dir, COLUMNS, _piece_writer(ctx.scratch_dir),
                           lambda it, desc: ctx.progress(it, desc, total=len(cleaned), unit="shard"))
    per_source = sel.per_source
    for src in sources:
        per_source[src.label]["files_skipped"] = src.files_skipped
    if not any(sel.documents.values()):
        raise StageError(_empty_corpus_message(per_source, sources, cfg))
    for split in ("train", "validation"):
        _save_split(sel.pieces[split], split, sel.digests[split].hexdigest(), cfg, ctx)
    n_train, n_validation = sel.documents["train"], sel.documents["validation"]
    shown = load_from_disk(str(ctx.out_dir / ("train" if n_train else "validation")))
    sample = shown.select(range(min(SAMPLE_DOCUMENTS, len(shown))))

    totals = {name: sum(s[name] for s in per_source.values()) for name in STAT_NAMES}
    stats = {"totals": totals, "per_source": per_source,
             "train_documents": n_train, "validation_documents": n_validation}
    atomic_write_json(ctx.out_dir / "stats.json", stats)
    atomic_write_text(ctx.out_dir / "sample.txt", _sample_text(sample))

    counts = {
        "documents_train": n_train, "documents_validation": n_validation,
        **{name: totals[name] for name in STAT_NAMES if name != "documents"},
        "sources": len(sources), "shards": len(cleaned),
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


def _clean_documents(raw: Dataset, cfg: PipelineConfig, ctx: StageContext) -> list[Path]:
    """The cleaned shards' files, in reading order (each shard keeps its rows' order)."""
    c = cfg.corpus
    folder = ctx.scratch_dir / "cleaned"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = clean_jobs([f["filename"] for f in raw.cache_files], len(raw), c.shard_documents, folder)
    ctx.map_shards(run_clean_shard, jobs, CleanRecipe(c.language, c.min_sentence_chars), "cleaning documents")
    return [job.out_file for job in jobs]


def _piece_writer(scratch: Path):
    """write_piece(table, split, k) for select_documents: one Arrow file per cleaned shard and split."""
    from datasets.arrow_writer import ArrowWriter

    folder = scratch / "pieces"
    folder.mkdir(parents=True, exist_ok=True)

    def write_piece(table, split: str, k: int) -> Path:
        path = folder / f"{split}-{k:05d}.arrow"
        writer = ArrowWriter(features=OUTPUT_FEATURES, path=str(path))
        try:
            writer.write_table(table)
            writer.finalize()
        finally:
            writer.close()
        return path

    return write_piece


def _save_split(pieces: list[Path], split: str, ids_digest: str, cfg: PipelineConfig, ctx: StageContext) -> None:
    # The saved fingerprint comes from the content (ids in order) and the configuration, not from
    # where the inputs live, so two runs on the same input write byte-identical files.
    fp = sha256_json({"split": split, "ids": ids_digest, "corpus": output_section(cfg)})[:32]
    if pieces:
        table = concatenate_datasets([Dataset.from_file(str(p)) for p in pieces]).data
    else:  # datasets would write no shard at all for an empty split, and then cannot load it back
        table = Dataset.from_dict({name: [] for name in COLUMNS}, features=OUTPUT_FEATURES).data
    Dataset(table, info=DatasetInfo(features=OUTPUT_FEATURES), fingerprint=fp).save_to_disk(
        str(ctx.out_dir / split), num_shards=None if pieces else 1)


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
