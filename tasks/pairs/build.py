"""Pairs stage: BERT pretraining examples (masked LM + both sentence-pair tasks, NSP and SOP) from the
corpus, streamed chunk by chunk.

Each split's documents are cut into chunks of pairs.chunk_documents consecutive documents; a chunk is
tokenized, made into pairs (instances.py: Google's instance loop, BERT's masking) and written as one
shard (outputs.py: the layout and the reader), by shards.py in this process or in run.num_proc worker
processes. train/ holds dupe_factor copies of each chunk (different boundaries and masks), copy by copy
within each shard; validation/ holds one copy, since an evaluation set needs one fixed masking. A random
B' comes from the same chunk (of the same split): that is what bounds memory, one chunk per worker
whatever the corpus size. Shards finished before an interruption are kept when the stage resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tasks.artifacts import atomic_write_text
from tasks.config import PipelineConfig
from tasks.corpus.outputs import load_split as load_corpus_split
from tasks.pairs import instances, outputs
from tasks.pairs.masking import IGNORE_INDEX, MaskingVocab
from tasks.pairs.shards import Recipe, ShardJob, chunk_bounds, run_shard
from tasks.stage import StageContext, StageError, StageReport

SPLITS = ("train", "validation")
SAMPLE_SIZE = 20


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def _load_split(corpus_dir: Path, split: str) -> Dataset:
    path = corpus_dir / split
    ds = load_corpus_split(corpus_dir, split)
    if ds is None:
        if split == "validation":
            raise StageError(
                f"the corpus has no validation documents ({path}); pairs needs a validation set. "
                "Set corpus.validation_fraction above 0 (e.g. 0.05) and rerun"
            )
        raise StageError(f"the corpus has no training documents ({path}); check corpus.sources")
    return ds


def _check_usable(split_name: str, corpus: Dataset) -> None:
    """Errors when no pair could be made: pairs need documents of two or more sentences, and a second
    document for random next sentences. Counted on the corpus, one Arrow chunk at a time."""
    multi = usable = 0
    for chunk in corpus.data.table.column("sentences").chunks:
        n = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
        multi += int((n >= 2).sum())
        usable += int((n >= 1).sum())
    if multi == 0 or usable < 2:
        raise StageError(
            f"the {split_name} split cannot make sentence pairs: {multi} of its {len(corpus)} "
            "documents have two or more sentences, and pairs need such documents (plus a second document "
            "for random next sentences). Use sources with multi-sentence documents (a .txt source cuts "
            "documents at blank lines), set corpus.min_document_sentences to 2 or more, or add text"
        )


def split_counts(shards: list[dict]) -> dict[str, float]:
    """The split's statistics, summed from its shards' own."""
    total = {k: sum(s[k] for s in shards) for k in ("examples", "tokens", "masked", "random_next", "swapped",
                                                    "bytes", "corpus_tokens")}
    n = max(total["examples"], 1)
    return {
        "examples": total["examples"],
        "tokens": total["tokens"],
        "mean_length": round(total["tokens"] / n, 2),
        "masked_fraction": round(total["masked"] / max(total["tokens"] - 3 * total["examples"], 1), 4),
        "nsp_random_fraction": round(total["random_next"] / n, 4),
        "sop_swapped_fraction": round(total["swapped"] / n, 4),
        "corpus_tokens": total["corpus_tokens"],
        "bytes_per_token": round(total["bytes"] / max(total["tokens"], 1), 3),
        "shards": len(shards),
    }


def render_sample(ds: outputs.PairsSplit, tok: PreTrainedTokenizerBase, n: int = SAMPLE_SIZE) -> str:
    """A readable sample: tokens of both views, predicted positions as [[input=>label]]."""

    def view(ids, labels) -> str:
        shown = tok.convert_ids_to_tokens([int(i) for i in ids])
        return " ".join(
            f"[[{t}=>{tok.convert_ids_to_tokens(int(lab))}]]" if lab != IGNORE_INDEX else t
            for t, lab in zip(shown, labels, strict=True)
        )

    lines = ["Predicted positions are shown as [[input token=>label]].", ""]
    for i in np.linspace(0, len(ds) - 1, num=min(n, len(ds)), dtype=int).tolist():
        ex = ds[i]
        nsp = "B' is the true next segment" if ex["next_sentence_label"] == 0 else \
            f"B' from document {ex['nsp_b_doc_index']}"
        sop = "swapped" if ex["sentence_order_label"] else "original order"
        lines += [
            f"example {i}, document {ex['doc_index']}",
            f"  NSP next_sentence_label={ex['next_sentence_label']} ({nsp}), length {ex['length']}:",
            f"    {view(ex['input_ids'], ex['labels'])}",
            f"  SOP sentence_order_label={ex['sentence_order_label']} ({sop}), length {ex['sop_length']}:",
            f"    {view(ex['sop_input_ids'], ex['sop_labels'])}",
            "",
        ]
    return "\n".join(lines)


def schema_text(cfg: PipelineConfig) -> str:
    return (
        f"# Pairs stage output ({outputs.FORMAT} version {outputs.FORMAT_VERSION})\n\n"
        f"Read it with `tasks.pairs.outputs.load_split`. max_seq_len {cfg.pairs.max_seq_len}, train copies "
        f"(dupe_factor) {cfg.pairs.dupe_factor}, validation copies 1, chunks of {cfg.pairs.chunk_documents} "
        "documents.\n\n```text\n" + outputs.__doc__ + "```\n\n## How the examples are made\n\n```text\n"
        + instances.__doc__ + "```\n"
    )


def recipe(tok: PreTrainedTokenizerBase, cfg: PipelineConfig) -> Recipe:
    return Recipe(tokenizer_json=tok.backend_tokenizer.to_str(), vocab=MaskingVocab.from_tokenizer(tok),
                  pairs=cfg.pairs, seed=cfg.run.seed, token_dtype=outputs.token_dtype(len(tok)).str)


def split_jobs(corpus_dir: Path, split: str, n_documents: int, cfg: PipelineConfig, out_dir: Path) -> list[ShardJob]:
    copies = cfg.pairs.dupe_factor if split == "train" else 1
    return [ShardJob(corpus_dir / split, split, i, lo, hi, out_dir / split, copies)
            for i, (lo, hi) in enumerate(chunk_bounds(n_documents, cfg.pairs.chunk_documents))]


def build_pairs(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    corpus_dir, tok_dir = ctx.upstream_dir("corpus"), ctx.upstream_dir("tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    corpora = {name: _load_split(corpus_dir, name) for name in SPLITS}  # fail fast on a missing split
    for name, corpus in corpora.items():
        _check_usable(name, corpus)
    documents = {name: len(corpus) for name, corpus in corpora.items()}
    del corpora
    shared = recipe(tok, cfg)
    specials = {"cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id, "vocab_size": len(tok)}
    counts: dict[str, float] = {}
    for name in SPLITS:
        jobs = split_jobs(corpus_dir, name, documents[name], cfg, ctx.out_dir)
        jobs[0].out_dir.mkdir(parents=True, exist_ok=True)
        shards = ctx.map_shards(run_shard, jobs, shared, f"{name} shards")
        stats = split_counts(shards)
        if stats["examples"] == 0:
            raise StageError(f"the {name} split made no pairs; its documents are too short, add text")
        outputs.write_split_file(ctx.out_dir / name, shards, specials)
        counts.update({f"{k}_{name}": v for k, v in stats.items()})
        counts[f"documents_{name}"] = documents[name]
        if name == "train":
            atomic_write_text(ctx.out_dir / "sample.txt", render_sample(outputs.load_split(ctx.out_dir, name), tok))
    atomic_write_text(ctx.out_dir / "SCHEMA.md", schema_text(cfg))
    # The headline figures under their short names.
    for k in ("masked_fraction", "nsp_random_fraction", "sop_swapped_fraction", "mean_length", "bytes_per_token"):
        counts[k] = counts[f"{k}_train"]
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    counts["tokens_per_second"] = round((counts["tokens_train"] + counts["tokens_validation"]) / counts["seconds"])
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        datasets=list(SPLITS),
        artifacts=["SCHEMA.md", "sample.txt"],
        details={"validation_copies": 1, "format": f"{outputs.FORMAT}/{outputs.FORMAT_VERSION}",
                 "order": "shard by shard (chunks of documents), copy by copy within a shard; shuffle when training"},
    )
