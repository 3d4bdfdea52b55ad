"""The registry: the pipeline's stages in order. Every list of stages, configuration sections and model
names is derived from SPECS (the configuration, the Prefect flow in flows/, `lightbert train`, the report,
the benchmarks, the tests). Importing it is cheap: a stage's build function is imported when it runs.

A new stage is a package tasks/<name>/ whose __init__.py declares STAGE (tasks.stage.StageSpec: its build
function, upstream stages, configuration section and cross-section checks, the models it registers, its
training section), added here in its place in the order."""

from __future__ import annotations

from tasks import (
    albert,
    cache,
    corpus,
    distilbert,
    evaluate,
    export,
    pairs,
    task_cache,
    task_distill,
    task_teacher,
    teacher,
    tokenizer,
)
from tasks.stage import StageSpec

SPECS: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (corpus.STAGE, tokenizer.STAGE, pairs.STAGE, teacher.STAGE, cache.STAGE, distilbert.STAGE,
                 albert.STAGE, task_teacher.STAGE, task_cache.STAGE, task_distill.STAGE, export.STAGE,
                 evaluate.STAGE)
}
STAGES: tuple[str, ...] = tuple(SPECS)
# The stages that train a model and can run on several GPUs (`lightbert train STAGE` under torchrun).
TRAINING_STAGES: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.training)
# {model name: registry name} of every model a pretraining stage saves, in stage order ("teacher" first:
# the reference the students are compared with). Per-task models ({task} in the name) are left out.
REGISTERED_NAMES: dict[str, str] = {model: registered for spec in SPECS.values()
                                    for model, registered in spec.models.items() if "{" not in model}
MODEL_NAMES: tuple[str, ...] = tuple(REGISTERED_NAMES)
STUDENT_NAMES: tuple[str, ...] = tuple(name for name in MODEL_NAMES if name != "teacher")


def stages_until(until: str | None) -> list[str]:
    if until is None:
        return list(STAGES)
    if until not in SPECS:
        raise ValueError(f"unknown stage {until!r} for --until; choose one of: {', '.join(STAGES)}")
    return list(STAGES[: STAGES.index(until) + 1])


def preflight(cfg, until: str | None = None) -> None:
    """Checks that need more than the configuration, run before any stage starts: a local labelled file
    named in evaluate.downstream.tasks is read and validated now (its columns, classes, splits), not
    after an hour of pretraining. Raises the loader's ConfigError / StageError, which name the fix."""
    from tasks.downstream import data
    from tasks.downstream.config import TaskSpec

    if "task_teacher" not in stages_until(until):
        return
    for task in cfg.evaluate.downstream.tasks:
        if isinstance(task, TaskSpec):
            data.load_task(task, cfg.evaluate.downstream, cfg.run.resolved_cache_dir())


def task_registered_name(model: str, task_slug: str) -> str:
    """The registry name of `model` fine-tuned on a task (declared by the task stages' specs):
    lightbert-teacher-<slug> for the teacher, lightbert-<student>-<slug> for a student."""
    if model == "teacher":
        return SPECS["task_teacher"].models["teacher-{task}"].format(task=task_slug)
    return SPECS["task_distill"].models["{student}-{task}"].format(student=model, task=task_slug)
