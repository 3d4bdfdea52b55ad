"""Pretraining instances of one chunk of documents, vectorised: tokenize (batch encoding in Rust), plan
the pairs (a Python loop over sentence lengths only, never over tokens), then cut, truncate, mask and lay
out every pair of the chunk with numpy array operations.

Planning follows Google's create_instances_from_document, document by document: sentences accumulate
into a chunk until it reaches a target length (max_seq_len - 3, or with probability short_seq_prob a
random shorter one), a random split point gives segment A and segment B, and when B is replaced by a
random document's text the unused sentences are put back. B is always A's true continuation (SOP never
crosses documents); B' is what the NSP view shows after A: B itself, or with probability nsp_random_prob
sentences of another document of the same chunk, from a random sentence on.

Where this departs from Google: a chunk holds whole sentences only. A sentence that would take the chunk
past max_seq_len - 3 tokens starts the next chunk instead, so A and B start and end at sentence
boundaries in either order and the SOP view carries no truncation cue. Google's truncate_seq_pair trims
the longer segment at a random end, but B, the tail that overflows, is the longer more often, so in the
swapped order segment 1 ends mid-sentence more often. Measured with a rule that reads only "does segment
1 end with . ! or ?" and answers "original order" when it does:
  - embedded corpora, 128 tokens, train split: 0.701 [0.694, 0.708] of SOP labels right with A trimmed
    at its front and B at its back (lightbert before this); 0.512 [0.505, 0.519] with whole sentences.
    The rest is a content cue, not truncation: B more often holds a document's last sentence, which more
    often lacks that punctuation (B ends with it 87.6% of the time, A 89.0%);
  - the test corpus (every sentence ends so): 0.553 with truncate_seq_pair's random ends; at chance with
    whole sentences (tests/pairs).
Only a chunk of two sentences that are together longer than max_seq_len - 3 is cut inside a sentence: by
truncate_seq_pair, the longer losing a token at a time from a random end (B on ties), the front share of
each segment's excess drawn at once from binomial(excess, 1/2). A random B' gets the room A leaves,
trimmed at a random end too. The price: pairs end a little short of max_seq_len (mean 111.5 tokens
against 116.2 at 128 on the embedded corpora) but keep the text truncation used to throw away (2.35 M
tokens from the same corpus against 2.03 M).

Masking is BERT's: A and B are masked together under one budget, min(max(1, round(n * mask_prob)),
max_predictions), and keep that masking in both views; a random B' gets its own share on top of A's. The
chosen positions become [MASK] (mask_token_prob), a random token (random_token_prob) or stay. With
whole_word_mask a word and its "##" pieces are chosen as a unit (a per-pair loop: masking.py).

Randomness: one numpy Generator per (seed, split, copy, chunk), so the output does not depend on how many
processes build the chunks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from tasks.pairs.config import PairsConfig
from tasks.pairs.masking import MaskingVocab, mask_segments, prediction_budget, random_next_budget


@dataclass
class TokenizedChunk:
    """The chunk's documents as flat arrays: sentence i is tokens[sentence_offsets[i]:sentence_offsets[i+1]],
    document d is sentences document_offsets[d] .. document_offsets[d+1] (empty sentences dropped)."""

    tokens: np.ndarray  # int32
    sentence_offsets: np.ndarray  # int64 (S + 1,)
    document_offsets: np.ndarray  # int64 (D + 1,)

    @property
    def n_documents(self) -> int:
        return len(self.document_offsets) - 1


def tokenize_chunk(documents: list[list[str]], tokenizer) -> TokenizedChunk:
    """`tokenizer`: a tokenizers.Tokenizer with truncation and padding off. One batch call for every
    sentence of the chunk; Python touches each sentence once (its id list), never each token."""
    flat = [s for doc in documents for s in doc]
    ids = [e.ids for e in tokenizer.encode_batch_fast(flat, add_special_tokens=False)] if flat else []
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    doc_of = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    keep = lengths > 0
    counts = np.bincount(doc_of[keep], minlength=len(documents))
    return TokenizedChunk(tokens, np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64),
                          np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


@dataclass
class Plan:
    """Per pair: sentence ranges [a0, a1) for A, [a1, b1) for B, [r0, r1) for a random B', the documents,
    and the two labels."""

    doc: np.ndarray
    a0: np.ndarray
    a1: np.ndarray
    b1: np.ndarray
    random_next: np.ndarray  # bool
    b_doc: np.ndarray  # B''s document (= doc when not random)
    r0: np.ndarray
    r1: np.ndarray
    swapped: np.ndarray  # bool


def plan_pairs(chunk: TokenizedChunk, rng: np.random.Generator, p: PairsConfig) -> Plan:
    """Google's instance loop over sentence lengths (see the module docstring). Uniform draws come from
    one array drawn up front: a pair consumes at least one sentence, so 2 per document + 5 per sentence
    is enough."""
    sent_off = chunk.sentence_offsets.tolist()
    doc_off = chunk.document_offsets.tolist()
    n_docs = chunk.n_documents
    pool = [d for d in range(n_docs) if doc_off[d + 1] > doc_off[d]]  # where a random B' can come from
    pool_rank = {d: i for i, d in enumerate(pool)}
    u = rng.random(2 * n_docs + 5 * (len(sent_off) - 1) + 1).tolist()
    k = 0
    max_tokens = p.max_seq_len - 3  # [CLS], [SEP], [SEP]
    rows: list[tuple[int, ...]] = []
    for d in range(n_docs):
        lo, hi = doc_off[d], doc_off[d + 1]
        target = max_tokens
        if u[k] < p.short_seq_prob:
            target = 2 + int(u[k + 1] * (max_tokens - 1))  # uniform in [2, max_tokens]
        k += 2
        start, i = lo, lo
        while i < hi:
            size = i - start + 1
            total = sent_off[i + 1] - sent_off[start]
            # Whole sentences only: a sentence that would overflow max_tokens starts the next chunk instead
            # (unless the chunk would be left with one sentence).
            overflow = size >= 3 and total > max_tokens
            if overflow or i == hi - 1 or (total >= target and size >= 2):
                end = i if overflow else i + 1  # the chunk is sentences [start, end)
                size = end - start
                nxt = end
                if size >= 2:
                    a_end = start + 1 + int(u[k] * (size - 1))  # uniform in [start + 1, end - 1]
                    b_doc, r0, r1 = d, a_end, end
                    random_next = u[k + 1] < p.nsp_random_prob and len(pool) >= 2
                    if random_next:
                        j = int(u[k + 2] * (len(pool) - 1))
                        b_doc = pool[j + (j >= pool_rank[d])]  # uniform over the other documents
                        blo, bhi = doc_off[b_doc], doc_off[b_doc + 1]
                        r0 = blo + int(u[k + 3] * (bhi - blo))
                        target_b = target - (sent_off[a_end] - sent_off[start])
                        r1 = r0 + 1
                        while r1 < bhi and sent_off[r1] - sent_off[r0] < target_b:
                            r1 += 1
                        nxt = a_end  # the unused sentences start the next chunk, as Google does
                    rows.append((d, start, a_end, end, random_next, b_doc, r0, r1, u[k + 4] < p.sop_swap_prob))
                    k += 5
                start, i = nxt, nxt
                continue
            i += 1
    cols = np.array(rows, dtype=np.int64).reshape(-1, 9).T
    return Plan(cols[0], cols[1], cols[2], cols[3], cols[4].astype(bool), cols[5], cols[6], cols[7],
                cols[8].astype(bool))


def fit_lengths(len_a: np.ndarray, len_b: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Lengths after truncate_seq_pair (the longer loses a token until the pair fits, B on ties), in
    closed form for arrays of pairs."""
    excess = np.maximum(len_a + len_b - max_tokens, 0)
    gap = np.abs(len_a - len_b)
    a_longer = len_a > len_b
    first = np.minimum(excess, gap)  # taken from the longer alone
    rest = excess - first  # then alternately, B first
    fa = np.where(a_longer, first, 0) + rest // 2
    fb = np.where(a_longer, 0, first) + (rest + 1) // 2
    return len_a - fa, len_b - fb


def _gather(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + lengths[i]) as one index array."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


def _choose(example: np.ndarray, budget: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices into `example` (the example of each candidate token, ascending): for each example, a
    uniformly random subset of its candidates of size min(budget, candidates)."""
    if len(example) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(example + rng.random(len(example)), kind="stable")
    counts = np.bincount(example, minlength=len(budget))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(example)) - first[example]  # example is sorted: order keeps it grouped
    return np.sort(order[rank < budget[example]])


@dataclass
class Examples:
    """A chunk's pairs as stored (outputs.py documents the layout)."""

    tokens: np.ndarray  # per example: A, B', then B again only when B' is random (inputs, corrupted)
    lengths: np.ndarray  # (n, 3): A, B', B; B is stored only when random_next (else it is B')
    label_positions: np.ndarray  # per example, ascending positions in its stored run
    label_ids: np.ndarray  # the original token there
    label_counts: np.ndarray  # (n,)
    next_sentence_label: np.ndarray
    sentence_order_label: np.ndarray
    doc_index: np.ndarray
    nsp_b_doc_index: np.ndarray


def make_examples(chunk: TokenizedChunk, rng: np.random.Generator, vocab: MaskingVocab, p: PairsConfig) -> Examples:
    plan = plan_pairs(chunk, rng, p)
    off = chunk.sentence_offsets
    n = len(plan.doc)
    max_tokens = p.max_seq_len - 3
    rnd = plan.random_next
    la, lb = fit_lengths(off[plan.a1] - off[plan.a0], off[plan.b1] - off[plan.a1], max_tokens)
    a_start = off[plan.a0] + rng.binomial(off[plan.a1] - off[plan.a0] - la, 0.5)
    b_start = off[plan.a1] + rng.binomial(off[plan.b1] - off[plan.a1] - lb, 0.5)
    lr_raw = off[plan.r1] - off[plan.r0]
    lr = np.minimum(lr_raw, max_tokens - la)
    r_start = off[plan.r0] + rng.binomial(np.maximum(lr_raw - lr, 0), 0.5)
    lbp = np.where(rnd, lr, lb)
    lengths = np.stack([la, lbp, np.where(rnd, lb, 0)], axis=1)
    seg_starts = np.stack([a_start, np.where(rnd, r_start, b_start), b_start], axis=1)
    src = _gather(seg_starts.ravel(), lengths.ravel())
    original = chunk.tokens[src]
    run_len = lengths.sum(axis=1)
    example = np.repeat(np.arange(n), run_len)
    seg = np.repeat(np.tile(np.arange(3), n), lengths.ravel())
    pos = np.arange(len(src)) - np.repeat(np.cumsum(run_len) - run_len, run_len)
    if p.whole_word_mask:
        chosen = _whole_word_positions(original, run_len, lengths, rnd, rng, vocab, p)
    else:
        in_ab = (seg == 0) | (seg == 2) | ((seg == 1) & ~rnd[example])  # A and B: masked together
        ab = np.flatnonzero(in_ab)
        chosen_ab = ab[_choose(example[ab], prediction_budget(la + lb, p), rng)]
        n_a = np.bincount(example[chosen_ab][seg[chosen_ab] == 0], minlength=n)
        budget_r = np.where(rnd, random_next_budget(n_a, lr, p), 0)
        rr = np.flatnonzero(~in_ab)
        chosen = np.sort(np.concatenate([chosen_ab, rr[_choose(example[rr], budget_r, rng)]]))
    inputs = original.copy()
    draw = rng.random(len(chosen))
    to_mask = chosen[draw < p.mask_token_prob]
    to_random = chosen[(draw >= p.mask_token_prob) & (draw < p.mask_token_prob + p.random_token_prob)]
    inputs[to_mask] = vocab.mask_id
    inputs[to_random] = rng.choice(vocab.random_ids, size=len(to_random))
    return Examples(
        tokens=inputs, lengths=lengths, label_positions=pos[chosen], label_ids=original[chosen],
        label_counts=np.bincount(example[chosen], minlength=n), next_sentence_label=rnd.astype(np.int8),
        sentence_order_label=plan.swapped.astype(np.int8), doc_index=plan.doc, nsp_b_doc_index=plan.b_doc)


def _whole_word_positions(original: np.ndarray, run_len: np.ndarray, lengths: np.ndarray, rnd: np.ndarray,
                          rng: np.random.Generator, vocab: MaskingVocab, p: PairsConfig) -> np.ndarray:
    """Whole-word masking, pair by pair (BERT's greedy word choice does not vectorise): positions into the
    chunk's stored runs."""
    out = []
    run_start = np.cumsum(run_len) - run_len
    for j in range(len(run_len)):
        la, lbp, lb = (int(x) for x in lengths[j])
        base = int(run_start[j])
        run = original[base:base + run_len[j]]
        b_at = la + lbp if rnd[j] else la  # where B sits in the run
        a, b = run[:la], run[b_at:b_at + (lb if rnd[j] else lbp)]
        (_, _), (a_lab, b_lab), _ = mask_segments([a, b], int(prediction_budget(len(a) + len(b), p)), rng, vocab, p)
        picked = [np.flatnonzero(a_lab >= 0), b_at + np.flatnonzero(b_lab >= 0)]
        if rnd[j]:
            n_a = len(picked[0])
            budget = int(random_next_budget(n_a, lbp, p))
            (_,), (r_lab,), _ = mask_segments([run[la:la + lbp]], budget, rng, vocab, p)
            picked.append(la + np.flatnonzero(r_lab >= 0))
        out.append(base + np.sort(np.concatenate(picked)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
