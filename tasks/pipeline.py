"""The pipeline's stages in order: the one list every runner derives its stages from (the Prefect flow
in flows/, the torchrun launcher, the benchmarks). Plain Python: it runs where only torch,
transformers and datasets are installed."""

from __future__ import annotations

from tasks import (
    albert,
    cache,
    corpus,
    distilbert,
    evaluate,
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
                 albert.STAGE, task_teacher.STAGE, task_cache.STAGE, task_distill.STAGE, evaluate.STAGE)
}
STAGES: tuple[str, ...] = tuple(SPECS)


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
    from tasks import downstream
    from tasks.config import TaskSpec

    if "task_teacher" not in stages_until(until):
        return
    for task in cfg.evaluate.downstream.tasks:
        if isinstance(task, TaskSpec):
            downstream.load_task(task, cfg.evaluate.downstream, cfg.run.resolved_cache_dir())
