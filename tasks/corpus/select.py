"""The corpus stage's selection in bounded memory: filter, de-duplicate (first occurrence wins), cap and
split the cleaned documents, and write each split's kept rows, shard by shard.

Exact de-duplication needs every document's key at once; here it is done out of core. Pass 1 reads the
small columns shard by shard and appends (128-bit key from the document id, row) of every long-enough
document to one of B bucket files by key. Pass 2 sorts one bucket at a time and records, for each such
row, the first row with its key (a memory-mapped int64 per row, on disk). Pass 3 walks the shards in
reading order, applies the cap and the split, counts per source and writes the kept rows. Memory: one
shard's small columns, one bucket (BUCKET_ROWS rows x 24 bytes: 48 MiB), one shard's kept rows; the
per-row array and the buckets live on disk (32 bytes per document in all).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUCKET_ROWS = 2 ** 21
KEY = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8")])
SMALL_COLUMNS = ["id", "source", "num_sentences", "characters", "short_sentences_dropped", "invalid_utf8"]
# Per-source statistics, in the order stats.json shows them.
STAT_NAMES = ("documents", "sentences", "characters", "documents_read", "documents_with_invalid_utf8",
              "documents_too_short", "duplicates_dropped", "documents_over_cap", "short_sentences_dropped",
              "files_skipped")


@dataclass
class Selection:
    """Each split's written pieces (in order), document count and sha256 of its ids in order, and the
    per-source statistics."""

    pieces: dict[str, list[Path]] = field(default_factory=lambda: {"train": [], "validation": []})
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0})
    digests: dict[str, Any] = field(default_factory=lambda: {"train": hashlib.sha256(), "validation": hashlib.sha256()})
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)


def _table(path: Path) -> pa.Table:
    from datasets.table import MemoryMappedTable

    return MemoryMappedTable.from_file(str(path)).table


def id_keys(ids: list[str]) -> np.ndarray:
    """(n, 2) uint64: the first 128 bits of each hex document id (a sha1 of its normalised text)."""
    if not ids:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(i[:32] for i in ids)), dtype=">u8").astype(np.uint64).reshape(-1, 2)


def is_validation(doc_id: str, fraction: float) -> bool:
    """The split depends on the document alone, so it is stable when sources are added or removed."""
    return int(doc_id[:8], 16) / 2**32 < fraction


def validation_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """is_validation for many documents at once, from their id_keys: the first 32 bits over 2^32 < fraction."""
    return (keys[:, 0] >> np.uint64(32)).astype(np.float64) / 2 ** 32 < fraction


def first_rows(shards: list[Path], min_sentences: int, scratch: Path, n_rows: int, progress) -> np.ndarray:
    """Per row, the first row with the same id among the rows of at least min_sentences sentences (-1 for
    a shorter row): passes 1 and 2. A memory map on disk."""
    n_buckets = max(1, -(-n_rows // BUCKET_ROWS))
    bucket_files = [scratch / f"dedupe-{b:04d}.bin" for b in range(n_buckets)]
    handles = [open(f, "wb") for f in bucket_files]  # noqa: SIM115 - closed below
    try:
        row = 0
        for path in progress(shards, "de-duplication keys"):
            t = _table(path).select(["id", "num_sentences"])
            n = t.num_rows
            long_enough = np.flatnonzero(t.column("num_sentences").to_numpy() >= min_sentences)
            ids = t.column("id").to_pylist()
            keys = id_keys([ids[i] for i in long_enough])
            rec = np.empty(len(long_enough), dtype=KEY)
            rec["hi"], rec["lo"], rec["row"] = keys[:, 0], keys[:, 1], long_enough + row
            bucket = (rec["lo"] % np.uint64(n_buckets)).astype(np.int64)
            for b in np.unique(bucket):
                rec[bucket == b].tofile(handles[b])
            row += n
    finally:
        for h in handles:
            h.close()
    first = np.lib.format.open_memmap(scratch / "first-rows.npy", mode="w+", dtype=np.int64, shape=(n_rows,))
    first[:] = -1
    for f in bucket_files:
        rec = np.fromfile(f, dtype=KEY)
        f.unlink()
        if not len(rec):
            continue
        rec = rec[np.lexsort((rec["row"], rec["lo"], rec["hi"]))]
        new_key = np.ones(len(rec), dtype=bool)
        new_key[1:] = (rec["hi"][1:] != rec["hi"][:-1]) | (rec["lo"][1:] != rec["lo"][:-1])
        group_start = np.maximum.accumulate(np.where(new_key, np.arange(len(rec)), 0))
        first[rec["row"]] = rec["row"][group_start]
    first.flush()
    return first


def select_documents(shards: list[Path], n_rows: int, labels: list[str], cfg_corpus, scratch: Path,
                     columns: list[str], write_piece, progress) -> Selection:
    """Passes 1-3 over the cleaned shards (in reading order, n_rows rows in all). `write_piece(table, split,
    k) -> Path` writes one shard's kept rows of a split; `progress(iterable, desc)` wraps each pass."""
    c = cfg_corpus
    sel = Selection(per_source={label: dict.fromkeys(STAT_NAMES, 0) for label in labels})
    first = first_rows(shards, c.min_document_sentences, scratch, n_rows, progress) if c.dedupe else None
    label_set = pa.array(labels, type=pa.string())
    kept_so_far, cutoff = 0, None  # cutoff: the row after the one that reached the cap
    row = 0
    for k, path in enumerate(progress(shards, "selecting documents")):
        t = _table(path)
        n = t.num_rows
        rows = np.arange(row, row + n)
        small = {name: t.column(name) for name in SMALL_COLUMNS}
        code = pc.index_in(small["source"], value_set=label_set).to_numpy()
        n_sent = small["num_sentences"].to_numpy().astype(np.int64)
        long_enough = n_sent >= c.min_document_sentences
        if first is not None:
            fr = np.asarray(first[row:row + n])
            is_first = long_enough & (fr == rows)
        else:
            fr, is_first = rows, long_enough
        repeat = long_enough & ~is_first  # a duplicate unless its first occurrence fell past the cap
        kept = is_first.copy()
        if c.max_documents is not None:
            rank = kept_so_far + np.cumsum(is_first)
            kept = is_first & (rank <= c.max_documents)
            if cutoff is None and kept_so_far + int(is_first.sum()) >= c.max_documents:
                cutoff = int(rows[is_first][c.max_documents - kept_so_far - 1]) + 1
        duplicate = repeat if cutoff is None else repeat & (fr < cutoff)
        over_cap = long_enough & ~kept & ~duplicate
        kept_so_far += int(kept.sum())

        ids = small["id"].to_pylist()
        keys = id_keys([ids[i] for i in np.flatnonzero(kept)])
        in_validation = np.zeros(n, dtype=bool)
        in_validation[kept] = validation_mask(keys, c.validation_fraction)
        chars = small["characters"].to_numpy().astype(np.int64)
        for name, weights in (("documents_read", np.ones(n)),
                              ("documents_with_invalid_utf8", small["invalid_utf8"].to_numpy(zero_copy_only=False)),
                              ("short_sentences_dropped", small["short_sentences_dropped"].to_numpy()),
                              ("documents_too_short", ~long_enough), ("duplicates_dropped", duplicate),
                              ("documents_over_cap", over_cap), ("documents", kept),
                              ("sentences", np.where(kept, n_sent, 0)), ("characters", np.where(kept, chars, 0))):
            sums = np.bincount(code, weights=np.asarray(weights, dtype=np.float64), minlength=len(labels))
            for label, v in zip(labels, sums.tolist(), strict=True):
                sel.per_source[label][name] += int(round(v))
        for split, where in (("train", kept & ~in_validation), ("validation", kept & in_validation)):
            idx = np.flatnonzero(where)
            if not len(idx):
                continue
            sel.digests[split].update("".join(ids[i] for i in idx).encode())
            sel.documents[split] += len(idx)
            sel.pieces[split].append(write_piece(t.select(columns).take(pa.array(idx)), split, k))
        row += n
    return sel
