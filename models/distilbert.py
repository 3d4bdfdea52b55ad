"""The DistilBERT student: a `DistilBertForMaskedLM` with the teacher's width and fewer layers, built from
the teacher's `BertConfig` and initialised from the teacher's weights along a layer mapping.

DistilBERT's blocks are BERT's blocks under other names (post-LayerNorm attention, then post-LayerNorm
FFN; the same scaling and activation), so a student layer copied from a teacher layer computes exactly
what that teacher layer computes. What DistilBERT drops: token-type embeddings, the pooler and the NSP
head. `PARAMETER_MAP` below names, for every student tensor, the teacher tensor it is copied from; the
teacher's token-type embedding of segment 0 is folded into the student's position embeddings, so that
the student's embeddings are the teacher's at token_type_ids = 0 (HF's extract_distilbert.py drops it).

Two layer maps (`resolve_layer_map`): `even`, every n_teacher / n_student-th layer ending at the last
([2, 4, ..., 12] for 12 -> 6, 1-based), and `hf`, the map of HF's released distilbert-base-uncased
(teacher layers 0, 2, 4, 7, 9, 11 0-based, scripts/extract_distilbert.py) generalised to any depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import BertConfig, DistilBertConfig, DistilBertForMaskedLM

# Student name (per layer: {i} = 0-based student layer) -> teacher name ({j} = 0-based teacher layer).
# The teacher is a BertForPreTraining or BertForMaskedLM (both have `bert.` and `cls.predictions.`).
EMBEDDING_MAP = {
    "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",  # + TOKEN_TYPE[0]
    "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
    "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
}
LAYER_MAP = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
HEAD_MAP = {  # BERT's head: dense -> activation -> LayerNorm -> decoder, as DistilBERT's
    "vocab_transform.weight": "cls.predictions.transform.dense.weight",
    "vocab_transform.bias": "cls.predictions.transform.dense.bias",
    "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "vocab_projector.weight": "cls.predictions.decoder.weight",  # tied to the word embeddings in both
    "vocab_projector.bias": "cls.predictions.bias",
}
# Added, row 0 (segment A), to the student's position embeddings: the student has no token types.
TOKEN_TYPE = "bert.embeddings.token_type_embeddings.weight"
POSITION = "distilbert.embeddings.position_embeddings.weight"
LAYER_MAPS = ("even", "hf")
# Without a teacher head (a BertModel teacher) these start fresh; the decoder is still the word embeddings.
FRESH_HEAD = ("vocab_transform.weight", "vocab_transform.bias", "vocab_layer_norm.weight", "vocab_layer_norm.bias",
              "vocab_projector.bias")


def default_num_layers(n_teacher: int) -> int:
    """Half the teacher's layers (at least one), as DistilBERT."""
    return max(1, n_teacher // 2)


def default_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """`even`: 1-based teacher layer of each student layer, spread evenly and ending at the teacher's last:
    student layer i <- teacher layer i * n_teacher / n_student (12 -> 6: 2, 4, 6, 8, 10, 12)."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot be mapped onto a teacher of {n_teacher}")
    return [i * n_teacher // n_student for i in range(1, n_student + 1)]


def hf_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """`hf`: HF's distilbert-base-uncased map, [0, 2, 4, 7, 9, 11] 0-based for 12 -> 6, generalised: the
    teacher's first and last layers are kept and the others spread between them, 0-based teacher layer
    round_half_up(i * (n_teacher - 1) / (n_student - 1)) for student layer i = 0..n_student-1 (12 -> 6 gives
    exactly HF's). Returned 1-based, as every layer map here: [1, 3, 5, 8, 10, 12]. One student layer
    cannot keep both ends: it takes the last teacher layer, as `even` does."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of {n_student} layers cannot be mapped onto a teacher of {n_teacher}")
    if n_student == 1:
        return [n_teacher]
    span, gaps = n_teacher - 1, n_student - 1
    return [1 + (2 * i * span + gaps) // (2 * gaps) for i in range(n_student)]  # integer round-half-up


def resolve_layer_map(n_teacher: int, num_layers: int | None = None,
                      layer_map: str | Sequence[int] | None = None) -> list[int]:
    """The mapping a configuration asks for (distilbert.num_layers / layer_map: even (or None), hf, or
    1-based teacher layers), checked against the teacher."""
    if layer_map is None or isinstance(layer_map, str):
        kind = layer_map or "even"
        if kind not in LAYER_MAPS:
            raise ValueError(f"distilbert.layer_map {kind!r} is not one of {list(LAYER_MAPS)} or a list of layers")
        n_student = num_layers or default_num_layers(n_teacher)
        return (hf_layer_map if kind == "hf" else default_layer_map)(n_teacher, n_student)
    layer_map = list(layer_map)
    if num_layers is not None and len(layer_map) != num_layers:
        raise ValueError(f"distilbert.layer_map {layer_map} has {len(layer_map)} entries for "
                         f"distilbert.num_layers = {num_layers}; give one teacher layer per student layer")
    if not layer_map or any(b <= a for a, b in zip(layer_map, layer_map[1:], strict=False)):
        raise ValueError(f"distilbert.layer_map {layer_map} must be increasing, e.g. [2, 4, 6]")
    if layer_map[0] < 1 or layer_map[-1] > n_teacher:
        raise ValueError(f"distilbert.layer_map {layer_map} names layers outside the teacher's 1..{n_teacher} "
                         "(1 = the first transformer layer)")
    return layer_map


def student_config(teacher: BertConfig, num_layers: int, dropout: float | None = None,
                   hidden_size: int | None = None, num_heads: int | None = None,
                   intermediate_size: int | None = None) -> DistilBertConfig:
    """The teacher's width, heads, FFN size, vocabulary and positions; `num_layers` layers. hidden_size,
    num_heads, intermediate_size (None = the teacher's) make a narrower student (TinyBERT's 312 x 12 heads
    x 1200 FFN), which cannot be initialised from the teacher's layers."""
    act = teacher.hidden_act if isinstance(teacher.hidden_act, str) else "gelu"
    drop = teacher.hidden_dropout_prob if dropout is None else dropout
    return DistilBertConfig(
        vocab_size=teacher.vocab_size,
        max_position_embeddings=teacher.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=num_layers,
        n_heads=num_heads or teacher.num_attention_heads,
        dim=hidden_size or teacher.hidden_size,
        hidden_dim=intermediate_size or teacher.intermediate_size,
        dropout=drop,
        attention_dropout=teacher.attention_probs_dropout_prob if dropout is None else dropout,
        activation=act,
        initializer_range=teacher.initializer_range,
        pad_token_id=teacher.pad_token_id if teacher.pad_token_id is not None else 0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def build_student(teacher_config: BertConfig, num_layers: int, dropout: float | None = None,
                  **width: int | None) -> DistilBertForMaskedLM:
    """A freshly (randomly) initialised student; `init_student_from_teacher` then copies the teacher in.
    width: student_config's hidden_size / num_heads / intermediate_size (None = the teacher's)."""
    return DistilBertForMaskedLM(student_config(teacher_config, num_layers, dropout, **width))


def same_shape_as_teacher(teacher: BertConfig, student: DistilBertConfig) -> bool:
    """Whether the student's blocks have the teacher's width, heads and FFN size (what copying layers needs)."""
    return (student.dim, student.n_heads, student.hidden_dim) == (
        teacher.hidden_size, teacher.num_attention_heads, teacher.intermediate_size)


def parameter_map(layer_map: Sequence[int], with_head: bool = True) -> dict[str, str]:
    """Every student parameter name -> the teacher parameter it is initialised from (with_head=False: all
    but FRESH_HEAD, for a teacher without an MLM head)."""
    mapping = dict(EMBEDDING_MAP)
    for i, t in enumerate(layer_map):
        for student_part, teacher_part in LAYER_MAP.items():
            for kind in ("weight", "bias"):
                mapping[f"distilbert.transformer.layer.{i}.{student_part}.{kind}"] = \
                    f"bert.encoder.layer.{t - 1}.{teacher_part}.{kind}"
    mapping.update(HEAD_MAP if with_head else {"vocab_projector.weight": "bert.embeddings.word_embeddings.weight"})
    return mapping


def teacher_has_mlm_head(teacher: nn.Module) -> bool:
    """A BertForPreTraining / BertForMaskedLM has one; a bare BertModel has none."""
    return hasattr(teacher, "cls") and hasattr(teacher.cls, "predictions")


@torch.no_grad()
def init_student_from_teacher(teacher: nn.Module, student: DistilBertForMaskedLM,
                              layer_map: Sequence[int]) -> dict[str, str]:
    """Copy the teacher's embeddings, the mapped layers (1-based `layer_map[i]` -> student layer i) and the
    MLM head into the student; the position embeddings get the teacher's token-type embedding 0 added, so
    that with token_type_ids = 0 the student's embeddings and first k layers (layer_map [1, ..., k]) compute
    the teacher's hidden states exactly. A teacher without a head (a bare BertModel) leaves the student's head
    transform and output bias at their fresh initialisation (the decoder is the word embeddings either
    way). Returns the mapping used. Raises if any other student tensor would be left at its random
    initialisation or shapes differ (a teacher of another width, vocabulary or position count)."""
    if len(layer_map) != student.config.n_layers:
        raise ValueError(f"layer_map {list(layer_map)} has {len(layer_map)} entries for a student of "
                         f"{student.config.n_layers} layers")
    with_head = teacher_has_mlm_head(teacher)
    teacher_state = teacher.state_dict()
    if not hasattr(teacher, "bert"):  # a BertModel: its own names lack the "bert." of the models with heads
        teacher_state = {f"bert.{k}": v for k, v in teacher_state.items()}
    # save_pretrained drops tied copies: the decoder is the word embeddings in a BERT that ties them
    if with_head and "cls.predictions.decoder.weight" not in teacher_state:
        teacher_state["cls.predictions.decoder.weight"] = teacher_state["bert.embeddings.word_embeddings.weight"]
    mapping = parameter_map(layer_map, with_head)
    params = dict(student.named_parameters(remove_duplicate=False))
    unmapped = sorted(set(params) - set(mapping) - (set() if with_head else set(FRESH_HEAD)))
    if unmapped:
        raise ValueError(f"student parameters with no teacher source: {unmapped}")
    for name, source in mapping.items():
        if source not in teacher_state:
            raise ValueError(f"the teacher has no {source} (for the student's {name}); is it a BERT with an MLM head?")
        value = teacher_state[source]
        if params[name].shape != value.shape:
            raise ValueError(f"{name} {tuple(params[name].shape)} cannot take the teacher's {source} "
                             f"{tuple(value.shape)}")
        params[name].copy_(value)
    if TOKEN_TYPE in teacher_state:  # a teacher without token types (none here) would have nothing to fold
        params[POSITION].add_(teacher_state[TOKEN_TYPE][0])
    return mapping


def mlm_head(student: DistilBertForMaskedLM, hidden: torch.Tensor) -> torch.Tensor:
    """DistilBERT's MLM head on (N, dim) hidden states gathered where a loss is: (N, vocab) logits."""
    x = student.vocab_transform(hidden)
    x = student.activation(x)
    x = student.vocab_layer_norm(x)
    return student.vocab_projector(x)
