"""Pairs stage: BERT pretraining examples (masked LM + a sentence-pair task) from the tokenized corpus.

Instances follow Google's create_pretraining_data.py, one document at a time: sentences accumulate
into a chunk until it reaches a target length (max_seq_len - 3, or with probability short_seq_prob a
random shorter one), a random split point gives segment A and segment B, and when B is replaced by a
random document the unused sentences are put back. Every example carries both sentence-pair tasks as
two views of the same (A, B):

NSP view (BERT, DistilBERT; HF BertForPreTraining conventions)
  input_ids            int32[]  [CLS] A [SEP] B' [SEP]
  token_type_ids       int8[]   0 for [CLS] A [SEP], 1 for B' [SEP]
  attention_mask       int8[]   all 1 (padding happens at batching)
  labels               int32[]  original id at predicted positions, -100 elsewhere
  next_sentence_label  int8     0: B' = B, the true continuation of A; 1: B' from another document
SOP view (ALBERT; HF AlbertForPreTraining conventions)
  sop_input_ids        int32[]  [CLS] A [SEP] B [SEP], or [CLS] B [SEP] A [SEP] when swapped
  sop_token_type_ids   int8[]   0 for the first segment with [CLS] and its [SEP], 1 for the second
  sop_attention_mask   int8[]   all 1
  sop_labels           int32[]  as labels
  sentence_order_label int8     0: original order, 1: swapped
Bookkeeping
  doc_index            int32    row of A's document in the corpus split
  nsp_b_doc_index      int32    row of the document B' came from (= doc_index when next_sentence_label 0)
  length, sop_length   int32    sequence lengths, for length bucketing

B is always A's true continuation in the same document, so an SOP pair never crosses documents.
A chunk needs two sentences to make a pair (a lone last sentence of a document is dropped).
A and B are masked together under one budget and keep that masking in both views; a random B' gets its
own masking. Truncation (Google trims the longer segment, at a random end) trims A at its front and
B (or B') at its back, so that A and B stay adjacent text: an NSP positive and every SOP pair are
exactly consecutive tokens of the document.

Randomness is a numpy Generator per (seed, split, dupe, document), so the output does not depend on
num_proc. train/ holds dupe_factor copies (different boundaries and masks), ordered copy by copy and
document by document (the trainer shuffles); validation/ holds one copy, since an evaluation set
needs one fixed masking, and its random B' come from validation documents only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, concatenate_datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tasks.artifacts import atomic_write_text, sha256_json
from tasks.config import PipelineConfig
from tasks.corpus.outputs import load_split as load_corpus_split
from tasks.pairs.config import PairsConfig
from tasks.pairs.masking import IGNORE_INDEX, MaskingVocab, mask_segments, prediction_budget
from tasks.stage import StageContext, StageError, StageReport

SPLITS = ("train", "validation")
SPLIT_SEED = {"train": 0, "validation": 1}
SAMPLE_SIZE = 20
TOKEN_FEATURES = Features({"sentence_ids": List(List(Value("int32")))})
FEATURES = Features({
    "input_ids": List(Value("int32")),
    "token_type_ids": List(Value("int8")),
    "attention_mask": List(Value("int8")),
    "labels": List(Value("int32")),
    "next_sentence_label": Value("int8"),
    "sop_input_ids": List(Value("int32")),
    "sop_token_type_ids": List(Value("int8")),
    "sop_attention_mask": List(Value("int8")),
    "sop_labels": List(Value("int32")),
    "sentence_order_label": Value("int8"),
    "doc_index": Value("int32"),
    "nsp_b_doc_index": Value("int32"),
    "length": Value("int32"),
    "sop_length": Value("int32"),
})


# ------------------------------------------------------------------------------------------------
# tokenized documents
# ------------------------------------------------------------------------------------------------
def tokenize_documents(corpus: Dataset, tok: PreTrainedTokenizerBase, cache_file: Path, fingerprint: str,
                       num_proc: int) -> Dataset:
    """One row per document: `sentence_ids`, the token ids of each sentence (empty ones dropped)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        flat = [s for doc in batch["sentences"] for s in doc]
        if not flat:
            return {"sentence_ids": [[] for _ in batch["sentences"]]}
        ids = tok(flat, add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        docs, k = [], 0
        for doc in batch["sentences"]:
            docs.append([s for s in ids[k:k + len(doc)] if s])
            k += len(doc)
        return {"sentence_ids": docs}

    return corpus.map(encode, batched=True, batch_size=200, num_proc=num_proc,
                      remove_columns=corpus.column_names, features=TOKEN_FEATURES,
                      cache_file_name=str(cache_file), new_fingerprint=fingerprint, desc="tokenizing")


@dataclass
class TokenizedSplit:
    """A tokenized split as flat arrays, for fast random access to any document's sentences. Built once per
    split into files (tokens int32, offsets int64: no 2^31 limit) and memory-mapped by every worker, so
    the workers share one copy in the page cache instead of each holding the split in its own memory."""

    tokens: np.ndarray  # every token id, documents and sentences in order
    sentence_offsets: np.ndarray  # sentence i is tokens[sentence_offsets[i]:sentence_offsets[i + 1]]
    document_offsets: np.ndarray  # document d is sentences document_offsets[d] .. document_offsets[d + 1]

    FILES = {"tokens": np.int32, "sentence_offsets": np.int64, "document_offsets": np.int64}

    @classmethod
    def write(cls, ds: Dataset, folder: Path) -> Path:
        """Stream the `sentence_ids` column into the three files, one Arrow chunk at a time (memory: one
        chunk); offsets are rebased to global int64 ones."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {name: open(folder / f"{name}.bin", "wb") for name in cls.FILES}  # noqa: SIM115 - closed below
        try:
            n_tokens = n_sentences = 0
            for chunk in ds.data.table.column("sentence_ids").chunks:
                sentences = pc.list_flatten(chunk)
                doc_off = chunk.offsets.to_numpy().astype(np.int64)
                sent_off = sentences.offsets.to_numpy().astype(np.int64)
                tokens = pc.list_flatten(sentences).to_numpy().astype(np.int32, copy=False)
                (doc_off[:-1] - doc_off[0] + n_sentences).tofile(files["document_offsets"])
                (sent_off[:-1] - sent_off[0] + n_tokens).tofile(files["sentence_offsets"])
                tokens.tofile(files["tokens"])
                n_sentences += int(doc_off[-1] - doc_off[0])
                n_tokens += int(sent_off[-1] - sent_off[0])
            np.array([n_sentences], dtype=np.int64).tofile(files["document_offsets"])
            np.array([n_tokens], dtype=np.int64).tofile(files["sentence_offsets"])
        finally:
            for f in files.values():
                f.close()
        return folder

    @classmethod
    def open(cls, folder: Path) -> TokenizedSplit:
        arrays = {}
        for name, dtype in cls.FILES.items():
            path = Path(folder) / f"{name}.bin"
            arrays[name] = (np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size
                            else np.zeros(0, dtype=dtype))
        return cls(**arrays)

    @classmethod
    def from_dataset(cls, ds: Dataset, folder: Path) -> TokenizedSplit:
        return cls.open(cls.write(ds, folder))

    @property
    def n_documents(self) -> int:
        return len(self.document_offsets) - 1

    def sentence_counts(self) -> np.ndarray:
        return np.diff(self.document_offsets)

    def sentences(self, doc: int) -> list[np.ndarray]:
        lo, hi = self.document_offsets[doc], self.document_offsets[doc + 1]
        off = self.sentence_offsets[lo:hi + 1]
        return [np.asarray(self.tokens[off[i]:off[i + 1]]) for i in range(len(off) - 1)]


# Each worker process opens a split's files once.
_SPLIT_CACHE: dict[str, TokenizedSplit] = {}


def _tokenized_split(folder: Path) -> TokenizedSplit:
    if str(folder) not in _SPLIT_CACHE:
        _SPLIT_CACHE.clear()
        _SPLIT_CACHE[str(folder)] = TokenizedSplit.open(folder)
    return _SPLIT_CACHE[str(folder)]


# ------------------------------------------------------------------------------------------------
# instances
# ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    a: np.ndarray
    b: np.ndarray  # A's true continuation
    b_prime: np.ndarray  # what the NSP view shows after A: b, or a segment of another document
    b_doc: int
    is_random_next: bool
    swapped: bool


def fit_lengths(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """Lengths after Google's truncate_seq_pair: trim the longer segment one token at a time (B on
    ties) until the pair fits; computed in closed form instead of token by token."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return len_a, len_b
    gap = abs(len_a - len_b)
    if excess <= gap:
        return (len_a - excess, len_b) if len_a > len_b else (len_a, len_b - excess)
    rest, short = excess - gap, min(len_a, len_b)
    return short - rest // 2, short - (rest + 1) // 2


def random_segment(split: TokenizedSplit, doc: int, target: int, max_len: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Sentences of `doc` from a random one on, until `target` tokens (at least one sentence), cut to max_len."""
    sents = split.sentences(doc)
    start = int(rng.integers(0, len(sents)))
    taken, length = [], 0
    for sent in sents[start:]:
        taken.append(sent)
        length += len(sent)
        if length >= target:
            break
    return np.concatenate(taken)[:max_len]


def document_pairs(split: TokenizedSplit, doc: int, pool: np.ndarray, rng: np.random.Generator,
                   p: PairsConfig) -> list[Pair]:
    """Google's create_instances_from_document, with both views of each pair (see the module docstring)."""
    sents = split.sentences(doc)
    max_tokens = p.max_seq_len - 3  # [CLS], [SEP], [SEP]
    target = max_tokens
    if rng.random() < p.short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    pairs: list[Pair] = []
    chunk: list[np.ndarray] = []
    length, i = 0, 0
    while i < len(sents):
        chunk.append(sents[i])
        length += len(sents[i])
        if i == len(sents) - 1 or (length >= target and len(chunk) >= 2):
            if len(chunk) >= 2:
                a_end = int(rng.integers(1, len(chunk)))
                a, b = np.concatenate(chunk[:a_end]), np.concatenate(chunk[a_end:])
                len_a, len_b = fit_lengths(len(a), len(b), max_tokens)
                a, b = a[len(a) - len_a:], b[:len_b]
                if rng.random() < p.nsp_random_prob:
                    # Uniform over the other usable documents of the split.
                    k = int(rng.integers(0, len(pool) - 1))
                    b_doc = int(pool[k + (k >= np.searchsorted(pool, doc))])
                    b_prime = random_segment(split, b_doc, target - len_a, max_tokens - len_a, rng)
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk, as Google does
                else:
                    b_doc, b_prime = doc, b
                pairs.append(Pair(a, b, b_prime, b_doc, b_doc != doc, bool(rng.random() < p.sop_swap_prob)))
            chunk, length = [], 0
        i += 1
    return pairs


def _segment_pair(first: np.ndarray, second: np.ndarray, cls_id: int, sep_id: int,
                  fill: int | None = None) -> np.ndarray:
    """[CLS] first [SEP] second [SEP]; with `fill`, the same layout of a label row (fill at specials)."""
    if fill is None:
        return np.concatenate([[cls_id], first, [sep_id], second, [sep_id]]).astype(np.int32)
    return np.concatenate([[fill], first, [fill], second, [fill]]).astype(np.int32)


def _type_ids(len_first: int, len_second: int) -> np.ndarray:
    return np.repeat(np.array([0, 1], dtype=np.int8), [len_first + 2, len_second + 1])


def pair_views(pair: Pair, rng: np.random.Generator, vocab: MaskingVocab, specials: tuple[int, int],
               p: PairsConfig) -> dict[str, np.ndarray | int]:
    """Mask a pair and lay out its NSP and SOP views."""
    cls_id, sep_id = specials
    (a_in, b_in), (a_lab, b_lab), n_ab = mask_segments(
        [pair.a, pair.b], prediction_budget(len(pair.a) + len(pair.b), p), rng, vocab, p)
    if pair.is_random_next:
        # A keeps its masking; B' gets its own share, topping the whole up to BERT's budget rules.
        n_a = int((a_lab != IGNORE_INDEX).sum())
        budget = min(max(0 if n_a else 1, round(len(pair.b_prime) * p.mask_prob)),
                     p.resolved_max_predictions() - n_a)
        (bp_in,), (bp_lab,), _ = mask_segments([pair.b_prime], budget, rng, vocab, p)
    else:
        bp_in, bp_lab = b_in, b_lab
    first, second = ((b_in, b_lab), (a_in, a_lab)) if pair.swapped else ((a_in, a_lab), (b_in, b_lab))
    nsp_len = len(a_in) + len(bp_in) + 3
    return {
        "input_ids": _segment_pair(a_in, bp_in, cls_id, sep_id),
        "token_type_ids": _type_ids(len(a_in), len(bp_in)),
        "attention_mask": np.ones(nsp_len, dtype=np.int8),
        "labels": _segment_pair(a_lab, bp_lab, cls_id, sep_id, fill=IGNORE_INDEX),
        "next_sentence_label": int(pair.is_random_next),
        "sop_input_ids": _segment_pair(first[0], second[0], cls_id, sep_id),
        "sop_token_type_ids": _type_ids(len(first[0]), len(second[0])),
        "sop_attention_mask": np.ones(nsp_len - len(bp_in) + len(b_in), dtype=np.int8),
        "sop_labels": _segment_pair(first[1], second[1], cls_id, sep_id, fill=IGNORE_INDEX),
        "sentence_order_label": int(pair.swapped),
        "nsp_b_doc_index": pair.b_doc,
        "length": nsp_len,
        "sop_length": nsp_len - len(bp_in) + len(b_in),
    }


def _to_arrow(rows: list[dict[str, np.ndarray | int]], doc_index: list[int]) -> pa.Table:
    """Rows of numpy arrays -> one Arrow table, building list columns from flat buffers (far faster
    than converting millions of Python ints)."""
    columns = {}
    for name, feature in FEATURES.items():
        dtype = np.dtype(getattr(feature, "feature", feature).dtype)
        if name == "doc_index":
            columns[name] = pa.array(np.asarray(doc_index, dtype=dtype))
        elif isinstance(feature, List):
            parts = [r[name] for r in rows]
            offsets = np.zeros(len(parts) + 1, dtype=np.int32)
            np.cumsum([len(x) for x in parts], out=offsets[1:])
            values = np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        else:
            columns[name] = pa.array(np.asarray([r[name] for r in rows], dtype=dtype))
    return pa.Table.from_pydict(columns, schema=FEATURES.arrow_schema)


@dataclass(frozen=True)
class ExamplePlan:
    """Everything a worker needs to turn document indices into examples (picklable)."""

    tokens: Path  # the split's TokenizedSplit files
    pool: np.ndarray  # documents with at least one sentence: where random B' come from
    vocab: MaskingVocab
    specials: tuple[int, int]
    pairs: PairsConfig
    seed: int
    split: str


def make_examples(doc_indices: list[int], dupe: int, plan: ExamplePlan) -> pa.Table:
    split = _tokenized_split(plan.tokens)
    rows, docs = [], []
    for doc in doc_indices:
        rng = np.random.default_rng([plan.seed % 2**64, SPLIT_SEED[plan.split], dupe, doc])
        for pair in document_pairs(split, doc, plan.pool, rng, plan.pairs):
            rows.append(pair_views(pair, rng, plan.vocab, plan.specials, plan.pairs))
            docs.append(doc)
    return _to_arrow(rows, docs)


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


def _check_usable(split_name: str, split: TokenizedSplit) -> np.ndarray:
    """The pool of documents a random B' may come from; errors when no pair could be made."""
    counts = split.sentence_counts()
    multi = int((counts >= 2).sum())
    if multi == 0 or int((counts >= 1).sum()) < 2:
        raise StageError(
            f"the {split_name} split cannot make sentence pairs: {multi} of its {split.n_documents} "
            "documents have two or more sentences, and pairs need such documents (plus a second document "
            "for random next sentences). Use sources with multi-sentence documents (a .txt source cuts "
            "documents at blank lines), set corpus.min_document_sentences to 2 or more, or add text"
        )
    return np.flatnonzero(counts >= 1)


def build_split(split_name: str, corpus: Dataset, tok: PreTrainedTokenizerBase, cfg: PipelineConfig,
                ctx: StageContext, key: str) -> Dataset:
    tokens = tokenize_documents(corpus, tok, ctx.scratch_dir / f"{split_name}-tokens.arrow",
                                f"{key}-{split_name}-tokens", ctx.num_proc)
    flat = TokenizedSplit.write(tokens, ctx.scratch_dir / f"{split_name}-flat")
    pool = _check_usable(split_name, _tokenized_split(flat))
    plan = ExamplePlan(flat, pool, MaskingVocab.from_tokenizer(tok), (tok.cls_token_id, tok.sep_token_id),
                       cfg.pairs, cfg.run.seed, split_name)
    index = Dataset.from_dict({"doc": np.arange(len(tokens), dtype=np.int64)})
    copies = cfg.pairs.dupe_factor if split_name == "train" else 1
    parts = [
        index.map(make_examples, batched=True, batch_size=64, num_proc=ctx.num_proc, input_columns="doc",
                  fn_kwargs={"dupe": dupe, "plan": plan}, remove_columns=["doc"], features=FEATURES,
                  cache_file_name=str(ctx.scratch_dir / f"{split_name}-{dupe}.arrow"),
                  new_fingerprint=f"{key}-{split_name}-{dupe}", desc=f"{split_name} pairs, copy {dupe + 1}/{copies}")
        for dupe in range(copies)
    ]
    return concatenate_datasets(parts)


def split_counts(ds: Dataset) -> dict[str, float]:
    """The split's statistics, one Arrow chunk at a time (memory: one chunk, whatever the split's size)."""
    table = ds.data.table
    n = len(ds)
    tokens = sum(int(pc.sum(chunk).as_py() or 0) for chunk in table.column("length").chunks)
    masked = sum(int(pc.sum(pc.not_equal(pc.list_flatten(chunk), IGNORE_INDEX)).as_py() or 0)
                 for chunk in table.column("labels").chunks)

    def mean(column: str) -> float:
        return sum(int(pc.sum(chunk).as_py() or 0) for chunk in table.column(column).chunks) / max(n, 1)

    return {
        "examples": n,
        "tokens": tokens,
        "mean_length": round(tokens / max(n, 1), 2),
        "masked_fraction": round(masked / max(tokens - 3 * n, 1), 4),
        "nsp_random_fraction": round(mean("next_sentence_label"), 4),
        "sop_swapped_fraction": round(mean("sentence_order_label"), 4),
    }


def render_sample(ds: Dataset, tok: PreTrainedTokenizerBase, n: int = SAMPLE_SIZE) -> str:
    """A readable sample: tokens of both views, predicted positions as [[input=>label]]."""

    def view(ids: list[int], labels: list[int]) -> str:
        shown = tok.convert_ids_to_tokens(ids)
        return " ".join(
            f"[[{t}=>{tok.convert_ids_to_tokens(lab)}]]" if lab != IGNORE_INDEX else t
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
        "# Pairs stage output\n\n"
        "`train/` and `validation/` are datasets Arrow datasets (`datasets.load_from_disk`), one row per "
        f"example, max_seq_len {cfg.pairs.max_seq_len}, train copies (dupe_factor) {cfg.pairs.dupe_factor}, "
        "validation copies 1.\n\n```text\n" + __doc__ + "```\n"
    )


@contextlib.contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """datasets' own progress bars (map, save) follow run.progress; the global switch is restored after."""
    was_disabled = datasets.are_progress_bars_disabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            datasets.disable_progress_bars()
        else:
            datasets.enable_progress_bars()


def build_pairs(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    with datasets_progress(cfg.run.progress):
        return _build_pairs(cfg, ctx)


def _build_pairs(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    corpus_dir, tok_dir = ctx.upstream_dir("corpus"), ctx.upstream_dir("tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    # datasets derives state.json fingerprints from the functions it runs unless told: name them after
    # what decides the output so that two runs write identical files.
    key = sha256_json({"pairs": cfg.section("pairs"), "seed": cfg.run.seed,
                       "upstream": {n: r.fingerprint for n, r in ctx.upstream.items()}})[:16]
    corpora = {name: _load_split(corpus_dir, name) for name in SPLITS}  # fail fast on a missing split
    counts: dict[str, float] = {}
    for name in SPLITS:
        ds = build_split(name, corpora[name], tok, cfg, ctx, key)
        if len(ds) == 0:
            raise StageError(f"the {name} split made no pairs; its documents are too short, add text")
        ds.save_to_disk(str(ctx.out_dir / name))
        counts.update({f"{k}_{name}": v for k, v in split_counts(ds).items()})
        counts[f"documents_{name}"] = len(corpora[name])
        if name == "train":
            atomic_write_text(ctx.out_dir / "sample.txt", render_sample(ds, tok))
    atomic_write_text(ctx.out_dir / "SCHEMA.md", schema_text(cfg))
    # The headline figures under their short names.
    for k in ("masked_fraction", "nsp_random_fraction", "sop_swapped_fraction", "mean_length"):
        counts[k] = counts[f"{k}_train"]
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        datasets=list(SPLITS),
        artifacts=["SCHEMA.md", "sample.txt"],
        details={"validation_copies": 1, "order": "copy by copy, document by document; shuffle when training"},
    )


