"""An ALBERT initialised from a BERT teacher: factorised embeddings from a truncated SVD of the teacher's
word embeddings, the shared layer copied from one teacher layer (Lan et al. 2020 train ALBERT from
scratch; this is lightbert's own start, in the spirit of DistilBERT's initialisation from the teacher).

Word embeddings. The teacher's W (V x H) = U S V^T; ALBERT factorises it as word_embeddings (V x E) then
embedding_hidden_mapping_in (E -> H). Rank E keeps the E largest singular values:
    word_embeddings               = U_E sqrt(S_E)            (V x E)
    embedding_hidden_mapping_in   = x -> x (sqrt(S_E) V_E^T)  (weight V_E sqrt(S_E), H x E; bias 0)
so word_embeddings @ weight^T = U_E S_E V_E^T, the best rank-E approximation of W (Eckart-Young: its
Frobenius error is sqrt(sum of the discarded S_i^2)); the square root splits the scale evenly between
the two factors, so neither starts orders of magnitude away from the other.

Where ALBERT cannot hold BERT exactly: ALBERT adds positions and token types to the word embeddings and
normalises in E space, before the projection; BERT does both in H space. So
    E = H   the factorisation is the identity (word_embeddings = W, the projection = I: also a rank-H SVD
            reconstruction), and positions, token types, the embeddings' LayerNorm and the MLM head's
            transform are copied as they are: the ALBERT's embedding output is the teacher's, exactly.
    E < H   positions and token types are their least-squares images in E space (x_E = x V_E / sqrt(S_E),
            so that x_E through the projection is x's projection onto the top-E subspace); the E-space
            LayerNorm and the MLM head's transform (H -> E, LayerNorm over E) start fresh (gamma 1, beta 0),
            and only the head's output bias is copied (its decoder is the word embeddings, tied).
The shared layer: every ALBERT layer module gets the teacher's layer `layer` (1-based; the stage's default
is the middle layer, see tasks/albert/config.py). Under sharing `all` that is the one layer applied L
times; under the other modes the unshared copies start equal. The pooler is copied; the SOP classifier
starts fresh (the teacher's NSP head answers another question). The ALBERT must have the teacher's hidden
size, heads, FFN size, activation, vocabulary and positions (checked, with the fix in the error).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AlbertForPreTraining

from models.albert import albert_layers

# AlbertLayer module -> BertLayer module: the same post-LayerNorm block under other names.
LAYER_MAP = {
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.dense": "attention.output.dense",
    "attention.LayerNorm": "attention.output.LayerNorm",
    "ffn": "intermediate.dense",
    "ffn_output": "output.dense",
    "full_layer_layer_norm": "output.LayerNorm",
}


def default_init_layer(n_teacher: int) -> int:
    """The middle teacher layer (1-based), rounding up: 12 -> 6, 2 -> 1, 3 -> 2."""
    return (n_teacher + 1) // 2


def factorise_embeddings(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V x E word embeddings, H x E projection weight, all singular values) of the rank-E truncated SVD
    of a V x H matrix, split by the square roots of the singular values (float64 inside)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root, s


def _copy(target: nn.Module, source: nn.Module) -> None:
    for name, p in target.named_parameters():
        q = dict(source.named_parameters())[name]
        if p.shape != q.shape:
            raise ValueError(f"{name} {tuple(p.shape)} cannot take the teacher's {tuple(q.shape)}")
        p.copy_(q)


def check_albert_fits_teacher(albert_config, teacher_config) -> None:
    """Raise ValueError naming the ALBERT setting to change when the teacher's weights cannot be copied in."""
    pairs = [("hidden_size", "hidden_size", "albert.hidden_size"),
             ("num_attention_heads", "num_attention_heads", "albert.num_heads"),
             ("intermediate_size", "intermediate_size", "albert.intermediate_size"),
             ("vocab_size", "vocab_size", "the teacher's tokenizer"),
             ("max_position_embeddings", "max_position_embeddings", "teacher.max_position_embeddings")]
    for ours, theirs, setting in pairs:
        a, t = getattr(albert_config, ours), getattr(teacher_config, theirs)
        if a != t:
            raise ValueError(f"an ALBERT initialised from the teacher needs the teacher's {theirs} ({t}), but it has "
                             f"{a}: leave {setting} unset (= the teacher's) or drop the teacher variant")
    if albert_config.embedding_size > albert_config.hidden_size:
        raise ValueError(f"albert.embedding_size ({albert_config.embedding_size}) is above the hidden size "
                         f"({albert_config.hidden_size}): a rank above H is no factorisation; set it to at most H")
    if albert_config.hidden_act != teacher_config.hidden_act:
        raise ValueError(f"the ALBERT's activation ({albert_config.hidden_act}) is not the teacher's "
                         f"({teacher_config.hidden_act}): build it with albert_config(..., hidden_act=the teacher's) "
                         "so the copied layer computes what the teacher's does")


@torch.no_grad()
def init_albert_from_teacher(teacher: nn.Module, albert: AlbertForPreTraining, layer: int) -> dict[str, Any]:
    """Copy a BERT teacher (BertForPreTraining / BertForMaskedLM / BertModel) into an ALBERT as the module
    docstring says; returns what was done (rank, the SVD's relative error, the layer, what starts fresh)."""
    backbone = teacher.bert if hasattr(teacher, "bert") else teacher
    tconf, aconf = backbone.config, albert.config
    check_albert_fits_teacher(aconf, tconf)
    n_teacher = tconf.num_hidden_layers
    if not 1 <= layer <= n_teacher:
        raise ValueError(f"albert.init_layer {layer} is not a teacher layer: use 1..{n_teacher}")
    rank, hidden = aconf.embedding_size, aconf.hidden_size
    temb, aemb = backbone.embeddings, albert.albert.embeddings
    mapping = albert.albert.encoder.embedding_hidden_mapping_in
    w = temb.word_embeddings.weight
    word, proj, s = factorise_embeddings(w, rank)
    fresh = ["sop_classifier"]
    if rank == hidden:  # the identity factorisation: everything in H space, copied as it is
        aemb.word_embeddings.weight.copy_(w)
        mapping.weight.copy_(torch.eye(hidden))
        for name in ("position_embeddings", "token_type_embeddings", "LayerNorm"):
            _copy(getattr(aemb, name), getattr(temb, name))
    else:
        aemb.word_embeddings.weight.copy_(word)
        mapping.weight.copy_(proj)
        to_e = proj / proj.pow(2).sum(0)  # x_E = x V_E / sqrt(S_E): the least-squares solution of x_E proj^T = x
        aemb.position_embeddings.weight.copy_(temb.position_embeddings.weight.double() @ to_e)
        aemb.token_type_embeddings.weight.copy_(temb.token_type_embeddings.weight.double() @ to_e)
        fresh += ["embeddings.LayerNorm", "predictions.dense", "predictions.LayerNorm"]
    mapping.bias.zero_()
    source = backbone.encoder.layer[layer - 1]
    for target in albert_layers(albert):
        for ours, theirs in LAYER_MAP.items():
            _copy(target.get_submodule(ours), source.get_submodule(theirs))
    pooler = getattr(backbone, "pooler", None)
    if pooler is not None and albert.albert.pooler is not None:
        _copy(albert.albert.pooler, pooler.dense)
    else:
        fresh.append("pooler")
    head = teacher.cls.predictions if hasattr(teacher, "cls") and hasattr(teacher.cls, "predictions") else None
    if head is not None:
        albert.predictions.bias.copy_(head.bias)
        if rank == hidden:
            _copy(albert.predictions.dense, head.transform.dense)
            _copy(albert.predictions.LayerNorm, head.transform.LayerNorm)
    else:
        fresh += ["predictions (the teacher has no MLM head)"]
    discarded = s[rank:].pow(2).sum().sqrt().item()
    return {"embedding_rank": rank, "teacher_layer": layer, "svd_frobenius_error": round(discarded, 6),
            "svd_relative_error": round(discarded / s.pow(2).sum().sqrt().item(), 6),
            "embeddings": "copied (E = H)" if rank == hidden else f"rank-{rank} SVD of the teacher's word embeddings",
            "fresh": sorted(set(fresh))}
