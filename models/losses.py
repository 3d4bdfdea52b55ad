"""DistilBERT's triple loss, L = a_ce * Lce + a_mlm * Lmlm + a_cos * Lcos (Sanh et al. 2019), in pure torch.

Lce, the soft-label loss, on a shared support. The teacher's distribution at a position is known on a
support S: its top-k tokens from the cache (tasks/cache/outputs.py), or the whole vocabulary when the
teacher runs in the same step. Teacher and student are both normalised over the SAME support at
temperature T:

    p_T = softmax(z_teacher / T) restricted to S and renormalised  (cache_format.soft_targets from the
          stored T=1 probabilities: p_i^(1/T) / sum_{j in S} p_j^(1/T))
    q_T = softmax(z_student[S] / T)                                (the student's logits gathered at S)
    Lce = T^2 * mean over positions of KL(p_T || q_T)

This is the KL between the two distributions conditioned on S. Renormalising only the teacher (and
taking the student's log-softmax over the whole vocabulary) would instead push the student to put all
its mass on S, which the teacher does not do whenever the top-k mass is below 1. With S = the whole
vocabulary (k = V, or the online teacher) it is exactly DistilBERT's KL on the full softmax. The T^2
keeps the gradient scale independent of T (Hinton et al. 2015). Positions: those with soft labels, the
masked positions by default (lightbert's choice, distilbert.ce_positions: masked); HF's distiller computes
Lce at every non-padding token unless --restrict_ce_to_mask is passed (distilbert.ce_positions: all).

Lmlm: cross-entropy of the student's full-vocabulary logits against the true tokens at the masked positions.
Lcos: 1 - cosine(student hidden, teacher hidden) averaged over the compared tokens, for one pair of
layers (the last ones, as DistilBERT's code) or averaged over several (each student layer and its mapped
teacher layer). DistilBERT's code compares every real token; the teacher cache keeps hidden states at the
masked positions by default (cache.hidden_positions), and the students then compare those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.bert import masked_lm_loss


@dataclass(frozen=True)
class LossWeights:
    ce: float = 5.0
    mlm: float = 2.0
    cos: float = 1.0
    temperature: float = 2.0


def soft_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean KL(teacher || student) over positions, both over the same support.

    student_logits: (P, S) the student's logits at the support's tokens (T = 1, not yet divided).
    teacher_probs:  (P, S) the teacher's distribution at temperature T over the same support (rows sum to 1).
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # kl_div takes xlogy(p, p): a zero teacher probability contributes 0, not NaN
    return F.kl_div(log_q, teacher_probs.float(), reduction="batchmean") * temperature ** 2


def gather_support(student_logits: torch.Tensor, support_ids: torch.Tensor) -> torch.Tensor:
    """(P, V) full-vocabulary logits -> (P, k) logits at each row's support ids (the teacher's top-k)."""
    return torch.gather(student_logits, 1, support_ids.long())


def cosine_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layer pairs of mean over tokens of 1 - cos(student, teacher). Either (B, T, H) each and
    token_mask (B, T) True at the tokens to compare, or no mask and (P, H) rows of the same P tokens."""
    where = None if token_mask is None else token_mask.bool()
    losses = []
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        if where is not None:
            s, t = s[where], t[where]
        s_tok, t_tok = s.float(), t.float()
        if s_tok.shape[0] == 0:
            losses.append(s_tok.sum() * 0.0)
            continue
        losses.append((1.0 - F.cosine_similarity(s_tok, t_tok, dim=-1)).mean())
    return torch.stack(losses).mean()


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the true tokens where labels != -100 (rows of student_logits aligned with labels)."""
    where = labels != -100
    return masked_lm_loss(student_logits[where], labels[where])


def combine(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """a_ce * ce_loss + a_mlm * mlm_loss + a_cos * cos_loss over the terms present."""
    coef = {"ce_loss": weights.ce, "mlm_loss": weights.mlm, "cos_loss": weights.cos}
    return sum(coef[name] * value for name, value in terms.items())  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# task-specific distillation (tasks/task_distill/): a fine-tuned teacher's logits teach a classifier
# ------------------------------------------------------------------------------------------------
def task_soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """T^2 * mean over examples of KL(softmax(teacher / T) || softmax(student / T)), (B, C) each: the
    classic knowledge-distillation term (Hinton et al. 2015) over the task's C labels."""
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return soft_label_loss(student_logits, p, temperature)


def task_distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                           alpha_ce: float, alpha_hard: float, temperature: float,
                           regression: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha_ce * soft term + alpha_hard * hard term, and each term. Classification: the soft term is
    task_soft_label_loss, the hard term cross-entropy on the labels. Regression (one output): there is
    no distribution to soften, so the soft term is the MSE to the teacher's prediction and the hard
    term the MSE to the label. Without teacher logits only the hard term is computed (weight 1)."""
    logits = student_logits.float()
    if regression:
        hard = F.mse_loss(logits.view(-1), labels.float().view(-1))
    else:
        hard = F.cross_entropy(logits, labels.long())
    if teacher_logits is None:
        return hard, {"hard_loss": hard.detach()}
    if regression:
        soft = F.mse_loss(logits.view(-1), teacher_logits.float().view(-1))
    else:
        soft = task_soft_label_loss(logits, teacher_logits, temperature)
    return alpha_ce * soft + alpha_hard * hard, {"soft_loss": soft.detach(), "hard_loss": hard.detach()}
