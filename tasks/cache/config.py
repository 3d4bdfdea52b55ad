"""The cache stage's section: which teacher outputs are kept for the students, and how."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.section import Section


class CacheConfig(Section):
    top_k: int = Field(64, ge=1, description="soft labels per position: the teacher's k likeliest tokens")
    positions: Literal["masked", "all"] = Field(
        "masked", description="where soft labels are kept: the masked positions or every real token")
    hidden_positions: Literal["masked", "all", "none"] = Field(
        "masked", description="where hidden states are kept (int8, a scale per token), and so where the "
        "students' Lcos is computed: the masked positions, every real token, or none (no Lcos from the cache)")
    hidden_layers: Literal["last", "mapped"] | list[int] = Field(
        "last", description="teacher hidden states kept (at cache.hidden_positions): 'last', layer numbers "
        "(1 = first transformer layer, 0 = embeddings), or 'mapped': the teacher layers of "
        "distilbert.layer_map and the last (what distilbert.cos_layers=mapped needs)")
    attention_layers: Literal["auto"] | list[int] = Field(
        "auto", description="teacher layers (1-based) whose attention scores q.k/sqrt(d) (every head, between "
        "the real tokens, float16) are kept, for the train split's nsp view (what the DistilBERT student reads): "
        "auto = the teacher layers of distilbert.matches' attention matches when distilbert.mode is cached, kept "
        "when the cache with them fits cache.max_bytes and otherwise computed by the teacher in the student's "
        "step; a list: those layers, which must fit; [] = none")
    splits: list[Literal["train", "validation"]] = Field(default_factory=lambda: ["train", "validation"])
    views: list[Literal["nsp", "sop"]] = Field(
        default_factory=lambda: ["nsp", "sop"],
        description="nsp: input_ids (BERT, DistilBERT); sop: sop_input_ids (ALBERT)")
    examples_per_shard: int = Field(2048, ge=1, description="examples per shard file (the unit of resuming)")
    batch_tokens: int = Field(16384, ge=16, description="padded tokens per inference batch (length-bucketed)")
    max_bytes: int = Field(8_000_000_000, ge=1, description="refuse to start when the estimated size is over")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU, fp32 on a CPU")

    @field_validator("hidden_layers")
    @classmethod
    def _layers(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v or min(v) < 0 or len(set(v)) != len(v):
                raise ValueError(f"hidden_layers must be 'last', 'mapped' or distinct layer numbers >= 0 (got {v}); "
                                 "e.g. [2, 4] (0 = embeddings)")
            return sorted(v)
        return v

    @field_validator("attention_layers")
    @classmethod
    def _attention(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if min(v, default=1) < 1 or len(set(v)) != len(v):
                raise ValueError(f"attention_layers must be 'auto' or distinct layer numbers >= 1 (got {v}); "
                                 "e.g. [2, 4] (layer 0, the embeddings, has no attention)")
            return sorted(v)
        return v

    @field_validator("splits", "views")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"needs at least one entry and no repeats (got {v})")
        return v


def requested_attention_layers(cfg) -> list[int]:
    """The teacher layers whose attention maps the cache is asked for (cache.attention_layers; auto: those of
    distilbert.matches' attention matches when the student reads the cache), before the byte budget."""
    layers = cfg.cache.attention_layers
    if layers != "auto":
        return list(layers)
    if cfg.distilbert.mode != "cached":
        return []
    return sorted({m.teacher_layer for m in cfg.distilbert.matches if m.feature == "attention"})


def cache_key(cfg) -> dict[str, Any]:
    section = cfg.section("cache")
    if section.get("attention_layers") == "auto":  # the key of a cache without attention maps stays as before
        section.pop("attention_layers")
    key: dict[str, Any] = {"cache": section}
    attention = requested_attention_layers(cfg)
    if attention and cfg.cache.attention_layers == "auto":  # which layers auto means comes from distilbert.matches
        key["attention_layers"] = attention
    if cfg.cache.hidden_layers == "mapped":  # which layers 'mapped' means comes from the student's section
        key["distilbert_layers"] = {"num_layers": cfg.distilbert.num_layers, "layer_map": cfg.distilbert.layer_map}
    return key


def check_layers(cfg) -> None:
    attention = cfg.cache.attention_layers
    if isinstance(attention, list) and attention and not cfg.teacher.pretrained and \
            max(attention) > cfg.teacher.num_layers:
        raise ValueError(f"cache.attention_layers {attention} names a layer above the teacher's "
                         f"{cfg.teacher.num_layers} (teacher.num_layers); use numbers from 1 to {cfg.teacher.num_layers}")
    layers = cfg.cache.hidden_layers
    if isinstance(layers, list) and not cfg.teacher.pretrained and max(layers) > cfg.teacher.num_layers:
        raise ValueError(
            f"cache.hidden_layers {layers} names a layer above the teacher's {cfg.teacher.num_layers} "
            f"(teacher.num_layers); use numbers from 0 (embeddings) to {cfg.teacher.num_layers}"
        )
