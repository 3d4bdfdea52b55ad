"""ALBERT on transformers' ALBERT classes: factorised embeddings (E), cross-layer sharing, sentence-order
prediction, and its pretraining loss (masked LM at the labelled positions only + SOP).

Sharing modes (`config.lightbert_sharing`, saved in config.json):
    all        one layer applied L times: num_hidden_groups = 1 (the official ALBERT).
    none       L independent layers: num_hidden_groups = L.
    attention  L layers whose self-attention block is one module; each layer keeps its own FFN block.
    ffn        L layers whose FFN block is one module; each layer keeps its own attention block.
The official code ships only `all`; `attention` and `ffn` are built here on num_hidden_groups = L by
assigning the first layer's modules to the others (module assignment, so the parameters are the same
tensors and `model.parameters()` lists them once). Which LayerNorm belongs to which block: the
post-attention LayerNorm lives inside transformers' AlbertAttention (`attention.LayerNorm`) and goes with
the attention block; the FFN block is `ffn` + `ffn_output` + `full_layer_layer_norm` (the LayerNorm
that normalises the FFN's residual output). Each block is thus "sublayer + its own residual LayerNorm",
as in the Transformer's Add & Norm.

Saving: safetensors cannot alias tensors, and save_pretrained refuses ties its class does not declare. A
state_dict hook (installed by `apply_sharing`) writes the shared blocks once per layer, so the files hold
every weight any ALBERT class expects: `AutoModelForMaskedLM.from_pretrained(dir)` loads them as is (the
layers are then equal copies, computing the same function), and `load_albert` reloads them with the ties
restored. The price: attention/ffn-shared checkpoints take the disk space of an unshared one for those
blocks (`all` and `none` have no duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AlbertConfig, AlbertForPreTraining, PreTrainedModel

from models.bert import IGNORE_INDEX, masked_lm_loss

Sharing = Literal["all", "attention", "ffn", "none"]
SHARING_MODES: tuple[str, ...] = ("all", "attention", "ffn", "none")
# Modules of an AlbertLayer that make up each shareable block (see the module docstring).
BLOCKS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "ffn": ("ffn", "ffn_output", "full_layer_layer_norm"),
}
# The SOP view of the pairs schema (tasks/pairs/): what ALBERT trains and is evaluated on.
SOP_INPUTS = ("sop_input_ids", "sop_token_type_ids", "sop_attention_mask", "sop_labels", "sentence_order_label")


def albert_config(vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  intermediate_size: int, max_position_embeddings: int, sharing: Sharing = "all",
                  pad_token_id: int = 0, bos_token_id: int = 2, eos_token_id: int = 3,
                  dropout: float = 0.0, hidden_act: str = "gelu_new") -> AlbertConfig:
    """An AlbertConfig for one of the sharing modes; the mode is kept as config.lightbert_sharing.
    hidden_act: ALBERT's gelu_new (tanh approximation) by default; BERT's gelu for an ALBERT initialised
    from a BERT teacher (models/albert_init.py), whose copied layer must compute what the teacher's does."""
    if sharing not in SHARING_MODES:
        raise ValueError(f"sharing must be one of {', '.join(SHARING_MODES)} (got {sharing!r})")
    config = AlbertConfig(
        vocab_size=vocab_size,
        embedding_size=embedding_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_hidden_groups=1 if sharing == "all" else num_layers,
        inner_group_num=1,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        classifier_dropout_prob=dropout,
        hidden_act=hidden_act,
        attn_implementation="sdpa",
    )
    config.lightbert_sharing = sharing
    return config


def sharing_of(config: AlbertConfig) -> str:
    """The stored mode; a plain ALBERT config (no lightbert_sharing) is `all` or `none` by its groups."""
    mode = getattr(config, "lightbert_sharing", None)
    if mode is None:
        return "all" if config.num_hidden_groups == 1 else "none"
    if mode not in SHARING_MODES:
        raise ValueError(f"config.lightbert_sharing = {mode!r} is not one of {', '.join(SHARING_MODES)}")
    return mode


def albert_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The AlbertLayer modules of each group, in order (one per layer unless sharing is `all`)."""
    encoder = model.base_model.encoder
    return [layer for group in encoder.albert_layer_groups for layer in group.albert_layers]


def _clone_duplicates(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a tensor seen under an earlier key is written again as a copy, so that
    safetensors (no aliasing) and every ALBERT class get one complete tensor per name."""
    seen: set[int] = set()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        tensor = state_dict[key]
        ptr = tensor.data_ptr()
        if ptr in seen:
            state_dict[key] = tensor.clone()
        else:
            seen.add(ptr)


def apply_sharing(model: PreTrainedModel, check_equal: bool = False) -> PreTrainedModel:
    """Tie the blocks the config's sharing mode shares: layer i's block becomes layer 0's module.

    check_equal=True (reloading): the copies in layers 1.. must equal layer 0's, else the checkpoint was
    not saved from a model with these ties and tying would silently throw weights away.
    """
    mode = sharing_of(model.config)
    layers = albert_layers(model)
    expected = 1 if mode == "all" else model.config.num_hidden_layers
    if len(layers) != expected or model.config.inner_group_num != 1:
        raise ValueError(f"sharing {mode!r} needs {expected} layer group(s) of one layer each; the model has "
                         f"{len(layers)} layer(s) in {model.config.num_hidden_groups} group(s)")
    for name in BLOCKS.get(mode, ()):
        first = getattr(layers[0], name)
        for i, layer in enumerate(layers[1:], start=1):
            other = getattr(layer, name)
            if other is first:
                continue
            if check_equal:
                for (pname, a), b in zip(first.state_dict().items(), other.state_dict().values(), strict=True):
                    if not torch.equal(a, b.to(a.device)):
                        raise ValueError(f"layer {i}'s {name}.{pname} differs from layer 0's: this checkpoint "
                                         f"does not have {mode!r} sharing; load it with its own class instead")
            setattr(layer, name, first)
    encoder = model.base_model.encoder
    if mode in BLOCKS and not getattr(encoder, "_lightbert_hooked", False):
        encoder.register_state_dict_post_hook(_clone_duplicates)
        encoder._lightbert_hooked = True
    return model


def build_albert_for_pretraining(config: AlbertConfig) -> AlbertForPreTraining:
    """A freshly initialised ALBERT with MLM and SOP heads and the config's sharing (offline)."""
    return apply_sharing(AlbertForPreTraining(config))


def load_albert(path: str | Path, cls: type[PreTrainedModel] = AlbertForPreTraining, **kwargs) -> PreTrainedModel:
    """from_pretrained, then the ties of the stored sharing mode restored (any ALBERT class)."""
    model = cls.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False, **kwargs)
    return apply_sharing(model, check_equal=True)


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a shared tensor counts once)."""
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# pretraining loss: MLM at the labelled positions + sentence-order prediction
# ------------------------------------------------------------------------------------------------
@dataclass
class AlbertOutput:
    loss: torch.Tensor  # mlm_loss + sop_loss
    mlm_loss: torch.Tensor
    sop_loss: torch.Tensor
    mlm_logits: torch.Tensor  # (n, V) at the rows of `positions`, row-major
    mlm_labels: torch.Tensor  # (n,)
    sop_logits: torch.Tensor  # (B, 2)
    last_hidden_state: torch.Tensor  # (B, T, H)
    positions: torch.Tensor  # (B, T) bool: where mlm_logits were computed


def albert_forward(model: AlbertForPreTraining, batch: dict[str, torch.Tensor],
                   extra_positions: torch.Tensor | None = None) -> AlbertOutput:
    """MLM + SOP on a padded SOP-view batch (SOP_INPUTS). The vocabulary projection runs only at the
    labelled positions (plus extra_positions, e.g. where a teacher's soft labels are); mlm_loss uses the
    labelled rows only."""
    ids, types, attention, labels, order = (batch[c] for c in SOP_INPUTS)
    labels = labels.long()
    out = model.albert(input_ids=ids, attention_mask=attention, token_type_ids=types, return_dict=True)
    labelled = labels != IGNORE_INDEX
    positions = labelled if extra_positions is None else labelled | extra_positions
    logits = model.predictions(out.last_hidden_state[positions])
    is_label = labelled[positions]
    mlm_logits, mlm_labels = logits, labels[positions]
    mlm_loss = masked_lm_loss(logits[is_label], mlm_labels[is_label])
    sop_logits = model.sop_classifier(out.pooler_output)
    sop_loss = F.cross_entropy(sop_logits.float(), order.long())
    return AlbertOutput(mlm_loss + sop_loss, mlm_loss, sop_loss, mlm_logits, mlm_labels, sop_logits,
                        out.last_hidden_state, positions)


def albert_pretraining_loss(model: AlbertForPreTraining, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The engine's loss_fn for ALBERT from scratch: (mlm + sop, {term: detached value})."""
    out = albert_forward(model, batch)
    return out.loss, {"mlm_loss": out.mlm_loss.detach(), "sop_loss": out.sop_loss.detach()}
