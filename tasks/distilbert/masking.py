"""Dynamic masking for online distillation, as HF's distiller (examples/research_projects/distillation,
Distiller.prepare_batch_mlm): a new mask for every batch, so an example seen twice is masked twice
differently, with the positions drawn in proportion to count(token) ** -mlm_smoothing (rare tokens more
often: HF's token_probs = max(counts, 1) ** -mlm_smoothing, 0.7 by default, special tokens 0).

Where lightbert departs: the number of positions is ceil(mlm_probability * the batch's maskable tokens)
(HF: * every token of the batch, [CLS] and [SEP] included, which are never chosen), the random
replacement is drawn from the non-special tokens only (HF: the whole vocabulary), and masking is token by
token even when the pairs stage masks whole words. The cached mode cannot mask dynamically: the cache
holds the teacher's outputs for the pairs stage's fixed masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


def token_probabilities(counts: np.ndarray, vocab_size: int, special_ids: Sequence[int],
                        smoothing: float) -> torch.Tensor:
    """(vocab_size,) float: max(count, 1) ** -smoothing, 0 for the special tokens (never masked)."""
    full = np.zeros(vocab_size, dtype=np.float64)
    full[:min(len(counts), vocab_size)] = counts[:vocab_size]
    probs = np.maximum(full, 1.0) ** -smoothing
    probs[list(special_ids)] = 0.0
    return torch.from_numpy(probs).float()


@dataclass
class DynamicMasker:
    """Re-masks an online batch (input_ids, attention_mask, labels; the fixed masks' labels give back the
    original tokens) in place of the pairs stage's masks. Draws from `generator`, or from torch's global RNG
    (the default), which the engine's checkpoints save, so a resumed run draws the masks an uninterrupted
    one would."""

    token_probs: torch.Tensor  # (V,) from token_probabilities
    mask_id: int
    random_ids: torch.Tensor  # non-special ids a "random token" replacement is drawn from
    mlm_probability: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __call__(self, batch: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ids, labels = batch["input_ids"], batch["labels"]
        original = torch.where(labels != IGNORE_INDEX, labels, ids)
        weights = self.token_probs.to(ids.device)[original] * batch["attention_mask"].to(torch.float32)
        flat = weights.flatten()
        n = math.ceil(self.mlm_probability * int((flat > 0).sum()))
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        if n:
            chosen[torch.multinomial(flat, n, replacement=False, generator=generator)] = True
        chosen = chosen.view_as(ids)
        u = torch.rand(ids.shape, generator=generator, device=ids.device)
        to_mask = chosen & (u < self.mask_token_prob)
        to_random = chosen & (u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)
        pick = torch.randint(len(self.random_ids), ids.shape, generator=generator, device=ids.device)
        inputs = torch.where(to_mask, torch.full_like(original, self.mask_id), original)
        inputs = torch.where(to_random, self.random_ids.to(ids.device)[pick], inputs)
        return {**batch, "input_ids": inputs, "labels": torch.where(chosen, original, IGNORE_INDEX)}
