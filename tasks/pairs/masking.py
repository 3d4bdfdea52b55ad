"""BERT's masked-LM corruption, vectorised with numpy: choose positions, then 80% [MASK] / 10% random /
10% unchanged (ratios from the config). Whole-word masking picks a token and its "##" pieces as a unit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.pairs.config import PairsConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class MaskingVocab:
    """What masking needs to know about the vocabulary; small enough to send to every worker."""

    mask_id: int
    random_ids: np.ndarray  # non-special ids a "random token" replacement is drawn from
    is_continuation: np.ndarray  # bool per id: a "##" piece that continues the previous word

    @classmethod
    def from_tokenizer(cls, tok: PreTrainedTokenizerBase) -> MaskingVocab:
        vocab = tok.get_vocab()
        size = max(vocab.values()) + 1
        special = set(tok.all_special_ids)
        is_continuation = np.zeros(size, dtype=bool)
        for token, idx in vocab.items():
            is_continuation[idx] = token.startswith("##")
        random_ids = np.array(sorted(set(vocab.values()) - special), dtype=np.int32)
        return cls(mask_id=tok.mask_token_id, random_ids=random_ids, is_continuation=is_continuation)


def prediction_budget(n_tokens, p: PairsConfig):
    """BERT's count of positions to predict in a sequence of n non-special tokens (an int or an array of
    them; numpy's round, like Python's, rounds half to even)."""
    return np.minimum(np.maximum(1, np.round(np.asarray(n_tokens) * p.mask_prob)),
                      p.resolved_max_predictions()).astype(np.int64)


def random_next_budget(n_a, n_random, p: PairsConfig):
    """The share of a random B' of n_random tokens, on top of the n_a positions A already has: its own
    15%, at least one position in the pair, and the pair's cap."""
    own = np.maximum(np.where(np.asarray(n_a) > 0, 0, 1), np.round(np.asarray(n_random) * p.mask_prob))
    return np.maximum(np.minimum(own, p.resolved_max_predictions() - np.asarray(n_a)), 0).astype(np.int64)


def _word_spans(tokens: np.ndarray, seg_starts: np.ndarray, vocab: MaskingVocab) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each word: a token plus its following "##" pieces, never crossing a segment start
    (a segment cut mid-word begins with a piece that then counts as a word of its own)."""
    starts_word = ~vocab.is_continuation[tokens]
    starts_word[seg_starts] = True
    starts = np.flatnonzero(starts_word)
    ends = np.append(starts[1:], len(tokens))
    return starts, ends


def choose_positions(tokens: np.ndarray, seg_starts: np.ndarray, budget: int, rng: np.random.Generator,
                     vocab: MaskingVocab, whole_word: bool) -> np.ndarray:
    """Sorted positions to predict: `budget` tokens, or whole words adding up to at most `budget`."""
    if budget <= 0:
        return np.empty(0, dtype=np.int64)
    if not whole_word:
        return np.sort(rng.permutation(len(tokens))[:budget])
    starts, ends = _word_spans(tokens, seg_starts, vocab)
    chosen, total = [], 0
    # As BERT: visit words in random order, skip a word that would overshoot the budget.
    for w in rng.permutation(len(starts)):
        size = int(ends[w] - starts[w])
        if total + size > budget:
            continue
        chosen.append(np.arange(starts[w], ends[w]))
        total += size
        if total == budget:
            break
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def corrupt(tokens: np.ndarray, positions: np.ndarray, rng: np.random.Generator, vocab: MaskingVocab,
            p: PairsConfig) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels): inputs with the chosen positions replaced, labels = original id there, else -100."""
    inputs = tokens.copy()
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int32)
    labels[positions] = tokens[positions]
    u = rng.random(len(positions))
    to_mask = u < p.mask_token_prob
    to_random = (u >= p.mask_token_prob) & (u < p.mask_token_prob + p.random_token_prob)
    inputs[positions[to_mask]] = vocab.mask_id
    inputs[positions[to_random]] = rng.choice(vocab.random_ids, size=int(to_random.sum()))
    return inputs, labels


def mask_segments(segments: list[np.ndarray], budget: int, rng: np.random.Generator, vocab: MaskingVocab,
                  p: PairsConfig) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Mask several segments under one budget; returns per-segment inputs and labels, and the count."""
    lengths = [len(s) for s in segments]
    tokens = np.concatenate(segments)
    seg_starts = np.cumsum([0, *lengths[:-1]])
    positions = choose_positions(tokens, seg_starts, budget, rng, vocab, p.whole_word_mask)
    inputs, labels = corrupt(tokens, positions, rng, vocab, p)
    cuts = np.cumsum(lengths[:-1])
    return np.split(inputs, cuts), np.split(labels, cuts), len(positions)
