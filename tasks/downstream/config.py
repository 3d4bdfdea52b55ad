"""`evaluate.downstream`: the labelled tasks, the fine-tuning budget and task-specific distillation. It
configures the three task stages (task_teacher, task_cache, task_distill) and the report's downstream
table; it sits inside the evaluate section, where users have always set it."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.section import Section

TASK_MODES = ("distilled", "hard")


def check_names(key: str, names: list[str] | None, known: tuple[str, ...]) -> None:
    """Each of `names` (the value of `key`) is one of `known`, the models the stages' specs declare."""
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ValueError(f"{key}: unknown model {unknown[0]!r}; choose from {', '.join(known)}")


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
    """Task-specific distillation (tasks/task_distill/): each student learns the task from the
    fine-tuned teacher's cached outputs, L = alpha_ce * T^2 * KL(teacher_T || student_T)
    + alpha_hard * CE(labels) [+ alpha_hidden * Lcos on the last layer]; next to it the same student
    trained on hard labels alone with the same budget and seeds."""

    students: list[str] | None = Field(
        None, description="which of the students the pretraining stages save (distilbert, albert-scratch, "
        "albert-distilled: tasks.pipeline.STUDENT_NAMES); None = every student the run trained")
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
    """A downstream task from your own labelled file, loaded by tasks/downstream/data.py with the datasets
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


# The task stages have no section of their own: evaluate.downstream configures them. What decides each one's
# output:
def downstream_key(cfg) -> dict[str, Any]:
    """What decides a fine-tune: the tasks and the budget (the students' settings change nothing here)."""
    section = cfg.section("evaluate")["downstream"]
    section.pop("distill")
    return section


def task_teacher_key(cfg) -> dict[str, Any]:
    dcfg = downstream_key(cfg)
    dcfg["learning_rates"] = {"bert": dcfg["learning_rates"]["bert"]}
    dcfg["seeds"] = dcfg["seeds"][:1]
    return {"downstream": dcfg}


def task_cache_key(cfg) -> dict[str, Any]:
    d = cfg.evaluate.downstream.distill
    return {"task_cache": {"hidden_states": d.alpha_hidden > 0, "examples_per_shard": d.cache_examples_per_shard}}


def task_distill_key(cfg) -> dict[str, Any]:
    return {"downstream": downstream_key(cfg), "distill": cfg.section("evaluate")["downstream"]["distill"]}
