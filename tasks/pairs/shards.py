"""One shard of the pairs stage: a chunk of consecutive corpus documents in, its examples (every copy)
out, written atomically. A job is a small picklable description, so that shards run in worker processes
or as separate tasks of an orchestrator, and a shard done before an interruption is kept.

Memory of a job: one chunk (pairs.chunk_documents documents) as text, its tokens (int32) and the
examples' arrays, whatever the corpus size. The corpus is memory-mapped only for the job's rows and
unmapped when the job ends."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.pairs import outputs
from tasks.pairs.config import PairsConfig
from tasks.pairs.instances import Examples, make_examples, tokenize_chunk
from tasks.pairs.masking import MaskingVocab

SPLIT_SEED = {"train": 0, "validation": 1}
STATS_FILE = "stats.json"


@dataclass(frozen=True)
class Recipe:
    """What every shard of a run shares (sent once to each worker process)."""

    tokenizer_json: str  # tokenizers.Tokenizer.to_str()
    vocab: MaskingVocab
    pairs: PairsConfig
    seed: int
    token_dtype: str


@dataclass(frozen=True)
class ShardJob:
    corpus_split: Path  # the corpus stage's split folder
    split: str
    index: int  # the chunk's number: its shard's name and its random stream
    first_doc: int
    end_doc: int
    out_dir: Path  # the split's output folder
    copies: int

    @property
    def folder(self) -> Path:
        return self.out_dir / f"shard-{self.index:05d}"

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:05d}"


def chunk_bounds(n_documents: int, chunk_documents: int) -> list[tuple[int, int]]:
    """[lo, hi) document ranges of about chunk_documents each (equal sizes: no small last chunk)."""
    n_chunks = max(1, -(-n_documents // chunk_documents))
    edges = np.linspace(0, n_documents, n_chunks + 1).round().astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _read_documents(job: ShardJob) -> list[list[str]]:
    from datasets import load_from_disk

    ds = load_from_disk(str(job.corpus_split)).select_columns(["sentences"])
    documents = ds[job.first_doc:job.end_doc]["sentences"]
    del ds  # unmaps the corpus
    return documents


def _tokenizer(recipe: Recipe):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(recipe.tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _concat(parts: list[Examples], dtype: np.dtype) -> dict[str, np.ndarray]:
    runs = [p.lengths.sum(axis=1) for p in parts]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(runs))]).astype(np.int64)
    labels = np.concatenate([[0], np.cumsum(np.concatenate([p.label_counts for p in parts]))]).astype(np.int64)
    return {
        "tokens": np.concatenate([p.tokens for p in parts]).astype(dtype),
        "offsets": offsets,
        "lengths": np.concatenate([p.lengths for p in parts]).astype(np.uint16),
        "label_offsets": labels,
        "label_positions": np.concatenate([p.label_positions for p in parts]).astype(np.uint16),
        "label_ids": np.concatenate([p.label_ids for p in parts]).astype(dtype),
        **{name: np.concatenate([getattr(p, name) for p in parts]).astype(np.int8 if name.endswith("label") else np.int64)
           for name in outputs.SCALAR_COLUMNS},
    }


def shard_stats(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """The shard's sums that the split's statistics add up."""
    lengths = arrays["lengths"].astype(np.int64)
    rnd = arrays["next_sentence_label"].astype(bool)
    ex = np.repeat(np.arange(len(lengths)), np.diff(arrays["label_offsets"]))
    in_nsp = arrays["label_positions"].astype(np.int64) < (lengths[:, 0] + lengths[:, 1])[ex]
    return {
        "examples": len(lengths),
        "tokens": int((lengths[:, 0] + lengths[:, 1] + 3).sum()),
        "sop_tokens": int((lengths[:, 0] + np.where(rnd, lengths[:, 2], lengths[:, 1]) + 3).sum()),
        "masked": int(in_nsp.sum()),
        "random_next": int(rnd.sum()),
        "swapped": int(arrays["sentence_order_label"].astype(np.int64).sum()),
        "bytes": int(sum(a.nbytes for a in arrays.values())),
    }


def run_shard(job: ShardJob, recipe: Recipe) -> dict[str, Any]:
    """Build the job's shard unless it is already there (a finished shard has its stats file); returns
    {"dir", **stats}."""
    stats_path = job.folder / STATS_FILE
    if stats_path.is_file():
        return json.loads(stats_path.read_text(encoding="utf-8"))
    chunk = tokenize_chunk(_read_documents(job), _tokenizer(recipe))
    parts = []
    for copy in range(job.copies):
        rng = np.random.default_rng([recipe.seed % 2**64, SPLIT_SEED[job.split], copy, job.index])
        ex = make_examples(chunk, rng, recipe.vocab, recipe.pairs)
        ex.doc_index = ex.doc_index + job.first_doc
        ex.nsp_b_doc_index = ex.nsp_b_doc_index + job.first_doc
        parts.append(ex)
    arrays = _concat(parts, np.dtype(recipe.token_dtype))
    stats = {"dir": job.folder.name, "documents": job.end_doc - job.first_doc,
             "corpus_tokens": int(len(chunk.tokens)), **shard_stats(arrays)}
    outputs.write_shard(job.folder, arrays, extra={STATS_FILE: json.dumps(stats, sort_keys=True)})
    return stats
