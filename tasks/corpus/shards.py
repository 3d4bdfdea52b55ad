"""The corpus stage's cleaning shards: a range of the raw documents in reading order in, the cleaned,
sentence-split documents out (one Arrow file per shard, written atomically). A job is a small picklable
description, so that shards run in local worker processes or as tasks on a Dask cluster; workers must
see the raw file at the same path (shared storage).

Memory of a job: one batch of MAP_BATCH_SIZE documents being cleaned and one Arrow record batch, whatever
the corpus size. Small shards also balance the workers: a wiki article costs about 50 times a plain-text
document per character, and the next free worker takes the next shard."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Features, List, Value

from tasks.text import process_document

PROCESSED_FEATURES = Features({
    "id": Value("string"), "source": Value("string"), "title": Value("string"),
    "sentences": List(Value("string")), "num_sentences": Value("int32"), "characters": Value("int64"),
    "short_sentences_dropped": Value("int32"), "invalid_utf8": Value("bool"),
})
# Small batches: a Wikipedia article's markup is tens of KB.
MAP_BATCH_SIZE = 64


@dataclass(frozen=True)
class CleanJob:
    raw_files: tuple[str, ...]  # the raw Arrow files (datasets cache files), in order
    index: int
    first_row: int
    end_row: int
    out_file: Path

    @property
    def name(self) -> str:
        return f"clean/shard-{self.index:05d}"


@dataclass(frozen=True)
class CleanRecipe:
    language: str
    min_sentence_chars: int


def clean_jobs(raw_files: list[str], n_rows: int, shard_documents: int, out_dir: Path) -> list[CleanJob]:
    edges = list(range(0, n_rows, shard_documents)) + [n_rows]
    return [CleanJob(tuple(raw_files), i, lo, hi, out_dir / f"clean-{i:05d}.arrow")
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))]


def _raw_table(raw_files: tuple[str, ...]):
    """The raw documents as one memory-mapped pyarrow Table (nothing is read until sliced)."""
    import pyarrow as pa
    from datasets.table import MemoryMappedTable

    return pa.concat_tables([MemoryMappedTable.from_file(f).table for f in raw_files])


def process_batch(batch: dict[str, list], language: str, min_sentence_chars: int) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for text, markup in zip(batch["text"], batch["markup"], strict=True):
        doc = process_document(text, markup, language, min_sentence_chars)
        for key in ("id", "sentences", "characters", "short_sentences_dropped"):
            out[key].append(doc[key])
        out["num_sentences"].append(len(doc["sentences"]))
    return {**out, "source": batch["source"], "title": batch["title"], "invalid_utf8": batch["invalid_utf8"]}


def run_clean_shard(job: CleanJob, recipe: CleanRecipe) -> dict[str, Any]:
    """Clean the job's rows into its Arrow file unless it is already there; returns {"file", "rows"}."""
    from datasets.arrow_writer import ArrowWriter

    if not job.out_file.is_file():
        rows = _raw_table(job.raw_files).slice(job.first_row, job.end_row - job.first_row)
        tmp = job.out_file.with_name(f".{job.out_file.name}.{os.getpid()}.tmp")
        writer = ArrowWriter(features=PROCESSED_FEATURES, path=str(tmp))
        try:
            for batch in rows.to_batches(max_chunksize=MAP_BATCH_SIZE):
                writer.write_batch(process_batch(batch.to_pydict(), recipe.language, recipe.min_sentence_chars))
            writer.finalize()
        finally:
            writer.close()
        os.replace(tmp, job.out_file)
    return {"file": job.out_file.name, "rows": job.end_row - job.first_row}
