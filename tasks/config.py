"""The pipeline's one typed configuration: a section per stage, presets as YAML under data/presets.

Loading order: preset YAML, then the user's YAML file, then `--set section.key=value` overrides.
Every error names the key, what is wrong with it and how to fix it.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("smoke", "cpu", "gpu")
# Stage order of the whole pipeline (tasks/pipeline.py holds the stages themselves).
ALL_STAGES = ("corpus", "tokenizer", "pairs", "teacher", "cache", "distilbert", "albert", "task_teacher", "task_cache",
              "task_distill", "evaluate")


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the configuration."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# run: settings shared by every stage
# ---------------------------------------------------------------------------------------------
class RunConfig(Section):
    seed: int = 42
    experiment: str = "lightbert"
    num_proc: int = Field(0, ge=0, description="worker processes for datasets.map; 0 = all cores (max 8)")
    cache_dir: str | None = Field(
        None, description="download cache for sources; default $LIGHTBERT_CACHE or ~/.cache/lightbert"
    )
    progress: bool = True

    def resolved_num_proc(self) -> int:
        return self.num_proc or max(1, min(os.cpu_count() or 1, 8))

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("LIGHTBERT_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "lightbert"


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
class SourceSpec(Section):
    """One corpus source. Exactly one of name / path / url / hf is set.

    A plain string in YAML is shorthand for {name: ...} (an embedded source of data/sources.yaml).
    """

    name: str | None = Field(None, description="embedded source, see data/sources.yaml")
    path: str | None = Field(None, description="local file or folder (.txt, .jsonl, .parquet, .xml.bz2)")
    url: str | None = Field(None, description="http(s) URL of a file in one of the local formats")
    sha256: str | None = Field(None, description="expected sha256 of the downloaded file (url only)")
    hf: str | None = Field(None, description="Hugging Face datasets id (needs a hub)")
    hf_config: str | None = None
    split: str = "train"
    # None = the embedded source's own setting (data/sources.yaml), else the default named here. Unset
    # stays distinguishable from set, also after a round trip through a saved config.
    text_field: str | None = Field(None, description="field/column with the text (.jsonl, .parquet, hf); "
                                   "default 'text'")
    format: Literal["auto", "txt", "jsonl", "parquet", "wikixml"] | None = Field(
        None, description="default auto: by each file's extension")
    txt_documents: Literal["blank_line", "file", "line"] | None = Field(
        None,
        description="how a .txt file is cut into documents: at blank lines (the default, BERT's "
        "convention), one document per file, or one per line",
    )
    max_documents: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> SourceSpec:
        kinds = [k for k in ("name", "path", "url", "hf") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                f"a source needs exactly one of name, path, url or hf (got {kinds or 'none'}); "
                "e.g. {name: enwiki-sample} or {path: /data/texts} or {url: https://...}"
            )
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {self.url!r})")
        if self.sha256 is not None:
            s = self.sha256.lower()
            if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
                raise ValueError("sha256 must be 64 hexadecimal characters")
            self.__dict__["sha256"] = s
        return self

    @property
    def label(self) -> str:
        """Short name used for per-source statistics."""
        return self.name or self.hf or self.url or Path(self.path or "").name or str(self.path)


class CorpusConfig(Section):
    sources: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec(name="enwiki-sample"), SourceSpec(name="bbc-news")]
    )
    language: str = Field("en", description="ISO code for the sentence splitter (sentencex)")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    min_sentence_chars: int = Field(2, ge=1)
    min_document_sentences: int = Field(2, ge=1, description="shorter documents are dropped")
    max_documents: int | None = Field(None, ge=1, description="cap on documents kept, after dedupe")
    dedupe: bool = True

    @field_validator("sources", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("at least one source is needed, e.g. sources: [enwiki-sample]")
        return v


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
class TokenizerConfig(Section):
    vocab_size: int = Field(8000, ge=64)
    lowercase: bool = True
    strip_accents: bool | None = Field(None, description="None: strip when lowercasing, as BERT does")
    split_cjk_chars: bool = Field(True, description="each CJK character its own token, as BERT-Chinese")
    min_frequency: int = Field(2, ge=1)
    limit_alphabet: int = Field(1000, ge=1)


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------
class PairsConfig(Section):
    max_seq_len: int = Field(128, ge=16)
    short_seq_prob: float = Field(0.1, ge=0.0, le=1.0)
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    mask_token_prob: float = Field(0.8, ge=0.0, le=1.0, description="of the chosen: -> [MASK]")
    random_token_prob: float = Field(0.1, ge=0.0, le=1.0, description="of the chosen: -> random token")
    max_predictions_per_seq: int | None = Field(
        None, ge=1, description="cap on masked positions; None = ceil(max_seq_len * mask_prob)"
    )
    whole_word_mask: bool = False
    dupe_factor: int = Field(5, ge=1, description="copies of the data with different masks")
    nsp_random_prob: float = Field(0.5, gt=0.0, lt=1.0, description="share of NSP pairs with a random B")
    sop_swap_prob: float = Field(0.5, gt=0.0, lt=1.0, description="share of SOP pairs swapped")

    @model_validator(mode="after")
    def _probabilities(self) -> PairsConfig:
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(
                "mask_token_prob + random_token_prob must be at most 1 (the rest stays unchanged); "
                "BERT uses 0.8 and 0.1"
            )
        return self

    def resolved_max_predictions(self) -> int:
        import math

        return self.max_predictions_per_seq or math.ceil(self.max_seq_len * self.mask_prob)


# ---------------------------------------------------------------------------------------------
# teacher (the stage comes with the teacher issue; its shape is needed now for validation, and a
# pretrained teacher's tokenizer replaces tokenizer training)
# ---------------------------------------------------------------------------------------------
class TrainingConfig(Section):
    """How a model is trained by tasks/engine.py (the teacher now, the students later)."""

    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="examples per forward pass on one device")
    effective_batch_size: int = Field(
        32, ge=1, description="examples per optimizer step over all devices; a multiple of batch_size "
        "(the rest is gradient accumulation)")
    learning_rate: float = Field(1e-4, gt=0.0, description="peak, after linear warmup; then linear decay to 0")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW; not on biases and LayerNorm")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; None = off")
    eval_every: int = Field(0, ge=0, description="steps between validation runs; 0 = only at the end")
    checkpoint_every: int = Field(100, ge=0, description="steps between resumable checkpoints; 0 = none")
    log_every: int = Field(10, ge=1, description="steps between logged training metrics")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU, fp32 on a CPU")

    @model_validator(mode="after")
    def _whole_accumulation(self) -> TrainingConfig:
        if self.effective_batch_size % self.batch_size:
            raise ValueError(
                f"effective_batch_size ({self.effective_batch_size}) must be a multiple of batch_size "
                f"({self.batch_size}); e.g. effective_batch_size: {self.batch_size * 2}"
            )
        return self


class MlmHeadFitConfig(TrainingConfig):
    """Fitting BERT's MLM head on a frozen pretrained backbone that has none (teacher.mlm_head: fit)."""

    max_steps: int = Field(200, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-3, gt=0.0, description="peak, after linear warmup; then linear decay to 0")
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(0, ge=0, description="steps between resumable checkpoints; 0 = none (the "
                                  "checkpoint would hold the whole frozen backbone)")
    log_every: int = Field(20, ge=1, description="steps between logged training metrics")


class TeacherConfig(Section):
    pretrained: str | None = Field(
        None, description="a BERT checkpoint: the name of an embedded teacher (minilm-l6, data/sources.yaml), a "
        "local folder or a hub id; it may lack the MLM head (see mlm_head); None = pretrain here"
    )
    mlm_head: Literal["fit", "none"] = Field(
        "fit", description="when the pretrained checkpoint has no MLM head: fit = fit BERT's head on the frozen "
        "backbone (mlm_head_fit) so the students get soft labels (Lce) and a trained head to start from; none = "
        "no head: the students learn from hidden states only (Lce is dropped). Default by measurement with "
        "minilm-l6: a 3-layer student after 50 steps reached val MLM accuracy 0.073 (fit, with Lce) and 0.084 "
        "(fit, alpha_ce 0) against 0.046 (none); the fit cost 92 s on 2 cores")
    mlm_head_fit: MlmHeadFitConfig = Field(default_factory=MlmHeadFitConfig,
                                           description="fitting the head (only with mlm_head: fit)")
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)
    max_position_embeddings: int = Field(512, ge=16)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="hidden and attention dropout")
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="pretraining (ignored "
                                  "when pretrained is set)")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TeacherConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# cache: the teacher's outputs over every pairs example, computed once for the students
# ---------------------------------------------------------------------------------------------
class CacheConfig(Section):
    top_k: int = Field(64, ge=1, description="soft labels per position: the teacher's k likeliest tokens")
    positions: Literal["masked", "all"] = Field(
        "masked", description="where soft labels are kept: the masked positions or every real token")
    hidden_layers: Literal["last", "mapped"] | list[int] = Field(
        "last", description="teacher hidden states kept (fp16, every real token): 'last', layer numbers "
        "(1 = first transformer layer, 0 = embeddings), or 'mapped': the teacher layers of "
        "distilbert.layer_map and the last (what distilbert.cos_layers=mapped needs)")
    splits: list[Literal["train", "validation"]] = Field(default_factory=lambda: ["train", "validation"])
    views: list[Literal["nsp", "sop"]] = Field(
        default_factory=lambda: ["nsp"],
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

    @field_validator("splits", "views")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"needs at least one entry and no repeats (got {v})")
        return v


# ---------------------------------------------------------------------------------------------
# distilbert: the student with half the teacher's layers, initialised from it (tasks/distilbert.py)
# ---------------------------------------------------------------------------------------------
ABLATION_ROWS = ("triple", "no_cos", "no_cos_no_mlm", "random_init", "random_init_mlm_only")
TABLE4_ROWS = ABLATION_ROWS[:4]  # the DistilBERT paper's Table 4 rows; the fifth is the no-teacher baseline


class DistilbertConfig(Section):
    num_layers: int | None = Field(None, ge=1, description="student layers; None = half the teacher's "
                                   "(or len(layer_map))")
    layer_map: list[int] | None = Field(
        None, description="teacher layer (1-based) each student layer is initialised from, increasing; "
        "None = every second layer ending at the last: [2, 4, ..., L]")
    init: Literal["teacher", "random"] = Field("teacher", description="teacher: embeddings, mapped layers and "
                                               "MLM head copied from the teacher; random: fresh weights")
    alpha_ce: float = Field(5.0, ge=0.0, description="weight of the soft-label KL loss (x T^2)")
    alpha_mlm: float = Field(2.0, ge=0.0, description="weight of the masked-LM cross-entropy on true tokens")
    alpha_cos: float = Field(1.0, ge=0.0, description="weight of the hidden-state cosine loss")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the soft-label loss")
    cos_layers: Literal["last", "mapped"] = Field(
        "last", description="last: student's last layer vs teacher's last (DistilBERT's code); mapped: every "
        "student layer vs its mapped teacher layer (needs cache.hidden_layers: mapped in cached mode)")
    mode: Literal["cached", "online"] = Field(
        "cached", description="cached: the teacher's top-k and hidden states from the cache stage; online: "
        "the teacher runs in every step (full distribution; the baseline)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None = the teacher's")
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    ablations: bool | list[Literal[ABLATION_ROWS]] = Field(  # type: ignore[valid-type]
        False, description=f"also train ablation rows at the same step budget: true = the paper's Table 4 "
        f"{list(TABLE4_ROWS)}, or a list of {list(ABLATION_ROWS)}")

    @model_validator(mode="after")
    def _layer_map(self) -> DistilbertConfig:
        m = self.layer_map
        if m is not None:
            if not m or min(m) < 1 or any(b <= a for a, b in zip(m, m[1:], strict=False)):
                raise ValueError(f"layer_map must be increasing teacher layer numbers from 1 (got {m}); "
                                 "e.g. [2, 4] for a 4-layer teacher")
            if self.num_layers is not None and len(m) != self.num_layers:
                raise ValueError(f"layer_map {m} has {len(m)} entries but num_layers is {self.num_layers}; "
                                 "give one teacher layer per student layer or leave num_layers unset")
        if self.alpha_ce + self.alpha_mlm + self.alpha_cos == 0:
            raise ValueError("alpha_ce, alpha_mlm and alpha_cos are all 0: nothing to train on")
        return self

    def ablation_rows(self) -> list[str]:
        if self.ablations is True:
            return list(TABLE4_ROWS)
        return list(self.ablations or [])


# ---------------------------------------------------------------------------------------------
# albert: factorised embeddings, cross-layer sharing, SOP; from scratch and distilled (tasks/albert.py)
# ---------------------------------------------------------------------------------------------
class AlbertSectionConfig(Section):
    variants: list[Literal["scratch", "distilled"]] = Field(
        default_factory=lambda: ["scratch", "distilled"],
        description="scratch: MLM + SOP on the pairs; distilled: the teacher's soft labels (cache) + MLM + SOP "
        "+ hidden-state cosine (needs 'sop' in cache.views)")
    embedding_size: int = Field(128, ge=8, description="E, the factorised embedding size (ALBERT: 128)")
    sharing: Literal["all", "attention", "ffn", "none"] = Field(
        "all", description="cross-layer parameter sharing: all (ALBERT), attention or ffn blocks only, none")
    hidden_size: int | None = Field(None, ge=8, description="None = the teacher's")
    num_layers: int | None = Field(None, ge=1, description="None = the teacher's")
    num_heads: int | None = Field(None, ge=1, description="None = the teacher's")
    intermediate_size: int | None = Field(None, ge=8, description="None = the teacher's")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="ALBERT v2 trains without dropout (paper, sec. 4.8)")
    alpha_ce: float = Field(5.0, ge=0.0, description="distilled: weight of the soft-label KL loss (x T^2)")
    alpha_mlm: float = Field(2.0, ge=0.0, description="distilled: weight of the masked-LM loss on true tokens")
    alpha_sop: float = Field(2.0, ge=0.0, description="distilled: weight of the SOP loss (= alpha_mlm: from "
                             "scratch MLM and SOP weigh the same)")
    alpha_cos: float = Field(1.0, ge=0.0, description="distilled: weight of the last-layer cosine loss (through "
                             "a learned projection when the hidden sizes differ)")
    temperature: float = Field(2.0, gt=0.0, description="distilled: softmax temperature of the soft-label loss")
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="each variant's training")

    @model_validator(mode="after")
    def _consistent(self) -> AlbertSectionConfig:
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants needs at least one of scratch, distilled and no repeats (got {self.variants})")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if "distilled" in self.variants and self.alpha_ce + self.alpha_mlm + self.alpha_sop + self.alpha_cos == 0:
            raise ValueError("alpha_ce, alpha_mlm, alpha_sop and alpha_cos are all 0: nothing to train on")
        return self


# ---------------------------------------------------------------------------------------------
# evaluate: every model scored the same way, the comparison report (tasks/evaluate.py)
# ---------------------------------------------------------------------------------------------
MODEL_NAMES = ("teacher", "distilbert", "albert-scratch", "albert-distilled")
STUDENT_NAMES = MODEL_NAMES[1:]
# Registry name of each model the pretraining stages save (their manifests' "models" entries).
REGISTERED_NAMES = {"teacher": "lightbert-teacher", "distilbert": "lightbert-distilbert",
                    "albert-scratch": "lightbert-albert-scratch", "albert-distilled": "lightbert-albert-distilled"}
TASK_MODES = ("distilled", "hard")


class FamilyLearningRates(Section):
    """Fine-tuning learning rates per model family. Each is a list: more than one is a sweep, and the
    one with the best validation metric is kept (per model, task and seed). Per family because one
    shared rate does not suit all: ALBERT's shared layers collapsed to one class at BERT-student rates."""

    bert: list[float] = Field(default_factory=lambda: [3e-5, 5e-5, 1e-4], description="the teacher")
    distilbert: list[float] = Field(default_factory=lambda: [1e-4])
    albert: list[float] = Field(default_factory=lambda: [5e-5])

    @field_validator("bert", "distilbert", "albert")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(x <= 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"needs at least one learning rate, all > 0 and no repeats (got {v}); e.g. [5.0e-5]")
        return v


class FamilyEpochs(Section):
    """Fine-tuning passes over the train split per model family (fractional allowed). A plain number in
    YAML sets every family. The distilled and the hard-label run of one student always share it."""

    bert: float = Field(2.0, gt=0.0, description="the teacher")
    distilbert: float = Field(2.0, gt=0.0)
    albert: float = Field(2.0, gt=0.0)


class TaskDistillConfig(Section):
    """Task-specific distillation (tasks/task_distill.py): each student learns the task from the
    fine-tuned teacher's cached outputs, L = alpha_ce * T^2 * KL(teacher_T || student_T)
    + alpha_hard * CE(labels) [+ alpha_hidden * Lcos on the last layer]; next to it the same student
    trained on hard labels alone with the same budget and seeds."""

    students: list[Literal[STUDENT_NAMES]] | None = Field(  # type: ignore[valid-type]
        None, description=f"which of {list(STUDENT_NAMES)}; None = every student the run trained")
    modes: list[Literal[TASK_MODES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(TASK_MODES),
        description="distilled: from the teacher's soft labels (+ hard labels); hard: hard labels only")
    alpha_ce: float = Field(1.0, ge=0.0, description="weight of T^2 * KL on the teacher's logits "
                            "(regression: of the MSE to the teacher's prediction)")
    alpha_hard: float = Field(1.0, ge=0.0, description="weight of the cross-entropy (regression: MSE) on the labels")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the soft labels")
    alpha_hidden: float = Field(0.0, ge=0.0, description="weight of 1 - cos between the student's and the "
                                "teacher's last hidden states at every real token (0 = off, nothing cached); a "
                                "student narrower than the teacher trains without it, which the report says")
    cache_examples_per_shard: int = Field(2048, ge=1, description="train examples per task-cache shard (the "
                                          "unit of resuming)")

    @model_validator(mode="after")
    def _useful(self) -> TaskDistillConfig:
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes needs at least one of {list(TASK_MODES)} and no repeats (got {self.modes})")
        if "distilled" in self.modes and self.alpha_ce + self.alpha_hard + self.alpha_hidden == 0:
            raise ValueError("alpha_ce, alpha_hard and alpha_hidden are all 0: the distilled students learn nothing")
        return self


LOCAL_TASK_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


class TaskSpec(Section):
    """A downstream task from your own labelled file, loaded by tasks/downstream.py with the datasets
    builders. In YAML a mapping in evaluate.downstream.tasks; a plain string ending in .csv, .tsv, .jsonl
    or .parquet is shorthand for {path: ...}. Splits come from split_column (train / validation / test;
    also train/training, validation/valid/val/dev/development, test/testing) or, without it, from a sha256
    of the id (id_column, else the text(s)) with validation_fraction / test_fraction."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: hashable, a task can key a dict

    name: str | None = Field(None, description="the task's name in reports and metrics; None = the file's "
                             "stem. Letters, digits and _ - . only")
    path: str = Field(description="the labelled file: .csv, .tsv (tab-separated, no quoting), .jsonl or .parquet")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field("auto", description="auto: by the extension")
    text_column: str = Field("text", description="the sentence (the first one of a pair)")
    text_pair_column: str | None = Field(None, description="the second sentence of a sentence-pair task")
    label_column: str = Field("label", description="classification: class names or integers (any number of "
                              "classes); regression: numbers")
    type: Literal["classification", "regression"] = "classification"
    split_column: str | None = Field(None, description="train / validation / test per row; None = by a hash "
                                     "of the id. Without validation rows, validation is a hash slice of train")
    id_column: str | None = Field(None, description="a stable id per row for the hash split; None = a hash of "
                                  "the text(s)")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        suffix = Path(self.path).suffix.lower()
        if self.format == "auto" and suffix not in LOCAL_TASK_FORMATS:
            raise ValueError(f"{self.path}: unknown extension {suffix or '(none)'!r}; use a "
                             f"{', '.join(LOCAL_TASK_FORMATS)} file, or say which it is with format: "
                             "csv | tsv | jsonl | parquet")
        name = self.name or Path(self.path).stem
        if not name or any(not (c.isalnum() or c in "_-.") for c in name):
            raise ValueError(f"task name {name!r} may hold only letters, digits and _ - . (it names metrics); "
                             "set name: to such a name")
        if name == "movie-sentences":  # glue/<task> cannot collide: "/" is not allowed
            raise ValueError(f"task name {name!r} is taken by a built-in task; set name: to another name")
        used = [c for c in (self.text_column, self.text_pair_column, self.label_column, self.split_column,
                            self.id_column) if c is not None]
        if len(set(used)) != len(used):
            raise ValueError(f"text_column, text_pair_column, label_column, split_column and id_column must be "
                             f"different columns (got {used})")
        self.__dict__["name"] = name
        return self

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> TaskSpec:
        """Validate one YAML mapping, with errors worded for its author (one line per problem)."""
        try:
            return cls.model_validate(entry)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    hint = difflib.get_close_matches(key, cls.model_fields, n=1)
                    problems.append(f"unknown key {key!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                                    f"known keys: {', '.join(cls.model_fields)}")
                elif err["type"] == "missing":
                    problems.append(f"{key} is required (the labelled file)" if key == "path" else f"{key} is required")
                else:
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.append(f"{key}: {msg}, got {err.get('input')!r}" if key else msg)
            raise ValueError("; ".join(problems)) from None


class DownstreamConfig(Section):
    """Fine-tuning every model on a sentence classification task, with the same budget and seeds."""

    tasks: list[str | TaskSpec] = Field(
        default_factory=lambda: ["movie-sentences"],
        description="movie-sentences: the embedded Rotten Tomatoes sentences (sentiment from the rating's "
        "sign); glue/<task> (e.g. glue/sst2): a GLUE task through datasets, needs a hub; or your own "
        "labelled file: a mapping {name, path, text_column, ...} (see TaskSpec) or just its path")
    max_seq_len: int = Field(64, ge=8, description="tokens per sentence (longer ones are truncated)")
    epochs: FamilyEpochs = Field(default_factory=FamilyEpochs, description="passes over the training split "
                                 "per family (bert, distilbert, albert); a number sets all three")
    max_train_examples: int | None = Field(None, ge=1, description="None = the whole training split")
    batch_size: int = Field(32, ge=1)
    learning_rates: FamilyLearningRates = Field(
        default_factory=FamilyLearningRates, description="peak, after warmup, then linear decay to 0; per "
        "family, a list is a sweep chosen on validation")
    evals_per_epoch: int = Field(2, ge=1, description="validation passes per epoch; the best one's weights "
                                 "are kept (the checkpoint is chosen on validation)")
    distill: TaskDistillConfig = Field(default_factory=TaskDistillConfig)
    bootstrap_resamples: int = Field(1000, ge=100, description="resamples of every bootstrap interval in the report")
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="classifier dropout")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads while fine-tuning on a CPU; None = "
                                    "torch's default (1 is faster for tiny models on a busy machine)")
    seeds: list[int] = Field(default_factory=lambda: [1], description="one fine-tuning run per seed and model; "
                             "the report gives the mean and each run")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="movie-sentences: by a hash of the id")
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="movie-sentences: by a hash of the id")

    @field_validator("epochs", mode="before")
    @classmethod
    def _one_number_for_all(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return {"bert": v, "distilbert": v, "albert": v}
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"seeds needs at least one seed and no repeats (got {v})")
        return v

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_entries(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out = []
        for i, entry in enumerate(v, 1):
            if isinstance(entry, str) and Path(entry).suffix.lower() in LOCAL_TASK_FORMATS:
                entry = {"path": entry}
            if isinstance(entry, dict):
                try:
                    entry = TaskSpec.from_entry(entry)
                except ValueError as exc:
                    raise ValueError(f"task {i} ({entry.get('name') or entry.get('path') or 'no path'}): {exc}") from None
            out.append(entry)
        return out

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str | TaskSpec]) -> list[str | TaskSpec]:
        for name in v:
            if isinstance(name, str) and name != "movie-sentences" and not (name.startswith("glue/") and len(name) > 5):
                raise ValueError(f"unknown downstream task {name!r}; use movie-sentences, glue/<task> (e.g. "
                                 "glue/sst2) or your own file: {name: NAME, path: FILE.csv, text_column: ..., "
                                 "label_column: ...}")
        names = [t if isinstance(t, str) else t.name for t in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"task names must be unique, and {', '.join(map(repr, twice))} appears more than once; "
                             "list each built-in task once and give each file task its own name: key")
        if not v:
            raise ValueError("needs at least one task, e.g. [movie-sentences]")
        return v


class EvaluateConfig(Section):
    models: list[Literal[MODEL_NAMES]] | None = Field(  # type: ignore[valid-type]
        None, description=f"which of {list(MODEL_NAMES)} to evaluate; None = every model the run trained "
        "(the teacher is always scored: it is the reference of retention and speed-up)")
    max_eval_examples: int | None = Field(None, ge=1, description="validation pairs scored; None = all")
    batch_size: int = Field(64, ge=1, description="examples per batch for MLM/NSP/SOP scoring")
    latency_sentences: int = Field(200, ge=1, description="validation sentences in one timed pass at batch 1")
    latency_repeats: int = Field(5, ge=1, description="timed passes; the median is reported")
    latency_threads: int = Field(1, ge=1, description="torch CPU threads while timing (stated in the report)")
    gpu_batch_size: int = Field(256, ge=1, description="batch of the GPU throughput measure (when a GPU is there)")
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    plots: bool = True


class PipelineConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    distilbert: DistilbertConfig = Field(default_factory=DistilbertConfig)
    albert: AlbertSectionConfig = Field(default_factory=AlbertSectionConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> PipelineConfig:
        # A pretrained teacher brings its own positions and layers: the teacher stage checks them.
        if not self.teacher.pretrained and self.pairs.max_seq_len > self.teacher.max_position_embeddings:
            raise ValueError(
                f"pairs.max_seq_len ({self.pairs.max_seq_len}) is above the model's position "
                f"embeddings (teacher.max_position_embeddings = {self.teacher.max_position_embeddings}); "
                "lower pairs.max_seq_len or raise teacher.max_position_embeddings"
            )
        layers = self.cache.hidden_layers
        if isinstance(layers, list) and not self.teacher.pretrained and max(layers) > self.teacher.num_layers:
            raise ValueError(
                f"cache.hidden_layers {layers} names a layer above the teacher's {self.teacher.num_layers} "
                f"(teacher.num_layers); use numbers from 0 (embeddings) to {self.teacher.num_layers}"
            )
        dmap = self.distilbert.layer_map
        if dmap is not None and not self.teacher.pretrained and max(dmap) > self.teacher.num_layers:
            raise ValueError(
                f"distilbert.layer_map {dmap} names a layer above the teacher's {self.teacher.num_layers} "
                f"(teacher.num_layers); use numbers from 1 to {self.teacher.num_layers}"
            )
        if (self.distilbert.num_layers is not None and not self.teacher.pretrained
                and self.distilbert.num_layers > self.teacher.num_layers):
            raise ValueError(f"distilbert.num_layers ({self.distilbert.num_layers}) is more than the teacher's "
                             f"{self.teacher.num_layers} layers (teacher.num_layers)")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """The JSON-ready dict of one section (what a stage's cache key is made of)."""
        return getattr(self, name).model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("data.presets").joinpath(f"{name}.yaml")))


def default_preset() -> str:
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (corpus:, pairs:, ...)")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set pairs.max_seq_len=64")
    dotted, raw = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if len(keys) < 2:
        raise ConfigError(f"--set {item!r}: name a section and a key, e.g. --set tokenizer.vocab_size=4000")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[keys[-1]] = value


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that `loc` (minus its last part) points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return sorted(getattr(current, "model_fields", {}))


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _known_keys(PipelineConfig, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            elsewhere = [f"{name}.{loc[-1]}" for name, f in PipelineConfig.model_fields.items()
                         if isinstance(f.annotation, type) and str(loc[-1]) in f.annotation.model_fields]
            fix = f"did you mean '{hint[0]}'? " if hint else (
                f"It belongs under {' or '.join(elsewhere)}. " if elsewhere else "")
            lines.append(f"{dotted}: unknown key. {fix}Known keys here: {', '.join(known)}")
        elif kind in ("int_parsing", "int_type", "float_parsing", "float_type", "bool_parsing", "bool_type",
                      "string_type", "int_from_float", "list_type", "dict_type", "model_type"):
            got = err.get("input")
            lines.append(f"{dotted}: {err['msg'].lower()}, got {got!r} ({type(got).__name__}); "
                         f"set it to a value of the right type")
        elif kind == "literal_error":
            lines.append(f"{dotted}: {err['msg']}, got {err.get('input')!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = f" (got {got!r})" if kind.startswith(("greater", "less")) else ""
            lines.append(f"{dotted}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[PipelineConfig, str]:
    """Resolve preset + file + overrides into a validated configuration; returns it and the preset."""
    preset = preset or default_preset()
    data = _read_yaml(preset_path(preset))
    if config_file is not None:
        data = _deep_merge(data, _read_yaml(Path(config_file)))
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
    return validate_config(data), preset


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved_config(cfg: PipelineConfig, workdir: Path) -> Path:
    """Write the configuration a run actually used to <workdir>/config.yaml."""
    from tasks.artifacts import atomic_write_text

    path = Path(workdir) / "config.yaml"
    atomic_write_text(path, dump_config(cfg))
    return path
