"""Task distillation stage: every student learns each downstream task twice, with the same budget and
seeds: `distilled` from the fine-tuned teacher's cached outputs (tasks/task_cache/),
L = alpha_ce * T^2 * KL(teacher_T || student_T) + alpha_hard * CE(labels) [+ alpha_hidden * Lcos],
and `hard` from the labels alone. The difference between the two is what task distillation buys; the
report (tasks/evaluate/) gives it with a paired bootstrap over examples and seeds.

Students: the models the pretraining stages saved (the general-distilled DistilBERT, the ALBERTs), or
`evaluate.downstream.distill.students`. Learning rates are per family (evaluate.downstream.learning_rates),
a list being a sweep chosen on validation per run; the checkpoint is chosen on validation too.

Output, per task `<slug>/`:
    <student>/<mode>/seed-<s>.json   one run: learning rate, validation/test metrics, the validation
                                     curve, per-example predictions (written as each run finishes: an
                                     interrupted stage resumes after the last finished run)
    <student>/distilled/model/       the distilled student of the first seed (save_pretrained + tokenizer),
                                     registered as lightbert-<student>-<slug>
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tasks import engine
from tasks.artifacts import atomic_write_json
from tasks.config import PipelineConfig
from tasks.downstream import data as downstream
from tasks.downstream import finetune
from tasks.pipeline import REGISTERED_NAMES, STUDENT_NAMES
from tasks.stage import StageContext, StageError, StageReport, saved_models
from tasks.task_cache import outputs as task_cache
from tasks.task_distill import STAGE
from tasks.task_distill.outputs import MODEL_DIR, run_path

log = logging.getLogger(__name__)

FAMILY_OF = {"distilbert": "distilbert", "albert-scratch": "albert", "albert-distilled": "albert", "albert-teacher": "albert"}


def saved_students(ctx: StageContext) -> dict[str, Path]:
    """{student name: saved model folder} from the upstream pretraining stages' manifests."""
    saved = saved_models(ctx.upstream[s] for s in ("distilbert", "albert") if s in ctx.upstream)
    return {name: saved[REGISTERED_NAMES[name]][1] for name in STUDENT_NAMES if REGISTERED_NAMES[name] in saved}


def students_to_train(cfg: PipelineConfig, ctx: StageContext) -> dict[str, Path]:
    found = saved_students(ctx)
    wanted = cfg.evaluate.downstream.distill.students
    if wanted is None:
        return {n: found[n] for n in STUDENT_NAMES if n in found}
    missing = [n for n in wanted if n not in found]
    if missing:
        raise StageError(f"evaluate.downstream.distill.students names {missing}, which this run did not train "
                         f"(trained: {sorted(found)}); drop them or add them to albert.variants")
    return {n: found[n] for n in wanted}


def build_task_distill(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    dcfg = cfg.evaluate.downstream
    kd = dcfg.distill
    rt = engine.setup_runtime("auto")
    students = students_to_train(cfg, ctx)
    counts: dict[str, float] = {}
    models, details = [], {"students": sorted(students), "modes": list(kd.modes), "seeds": list(dcfg.seeds),
                           "loss": {"alpha_ce": kd.alpha_ce, "alpha_hard": kd.alpha_hard,
                                    "temperature": kd.temperature, "alpha_hidden": kd.alpha_hidden},
                           "runs": {}}
    for task, data, info in downstream.load_tasks(cfg):
        regression = info.get("task_type") == "regression"
        slug, tdir = downstream.task_slug(task), ctx.out_dir / downstream.task_slug(task)
        targets = task_cache.load_targets(ctx.upstream_dir("task_cache"), task) if "distilled" in kd.modes else None
        for student, sdir in students.items():
            family = FAMILY_OF[student]
            student_kd, note = hidden_term_for(kd, sdir, targets)
            if note:
                details.setdefault("hidden_term_skipped", {})[student] = note
            tokenized = finetune.tokenize_task(data, sdir, dcfg.max_seq_len)
            for mode in kd.modes:
                for seed in dcfg.seeds:
                    path = run_path(tdir, student, mode, seed)
                    model_dir = tdir / student / mode / MODEL_DIR
                    keep_model = mode == "distilled" and seed == dcfg.seeds[0]
                    if ctx.resuming and path.is_file() and (not keep_model or (model_dir / "config.json").is_file()):
                        record = json.loads(path.read_text(encoding="utf-8"))
                    else:
                        log.info(f"task_distill: {task}: {student} ({mode}), seed {seed}")
                        best, table = finetune.sweep(
                            sdir, tokenized, info, dcfg, getattr(dcfg.learning_rates, family), seed=seed, rt=rt,
                            targets=targets if mode == "distilled" else None,
                            kd=student_kd if mode == "distilled" else None, progress=cfg.run.progress)
                        if keep_model:
                            finetune.save_model(best.model, model_dir, sdir)
                        loss = ({k: getattr(student_kd, k) for k in ("alpha_ce", "alpha_hard", "temperature",
                                                                     "alpha_hidden")} if mode == "distilled"
                                else {"alpha_hard": 1.0})
                        record = {**best.record(regression), "student": student, "mode": mode, "sweep": table,
                                  "loss": loss}
                        atomic_write_json(path, record)
                    metric = record["metric"]
                    key = f"{slug}_{student}_{mode}_seed{seed}"
                    counts[f"{key}_test_{metric}"] = record["test"][metric]
                    counts[f"{key}_validation_{metric}"] = record["validation"][metric]
                    details["runs"][key] = {"learning_rate": record["learning_rate"], "test": record["test"],
                                            "validation": record["validation"], "best_step": record["best_step"]}
            if "distilled" in kd.modes:
                models.append({"path": f"{slug}/{student}/distilled/{MODEL_DIR}", "name": STAGE.models["{student}-{task}"].format(student=student, task=slug),
                               "task": "text-classification"})
    return StageReport(counts=counts, inputs=[{"stage": n, "fingerprint": r.fingerprint}
                                              for n, r in ctx.upstream.items()],
                       details=details, models=models)


def hidden_term_for(kd, student_dir: Path, targets) -> tuple[Any, str | None]:
    """The distillation settings for one student: the hidden-state term needs the teacher's width (no
    projection is learned here), so a narrower student trains without it, and the note says so."""
    if kd.alpha_hidden == 0 or targets is None or targets.hidden is None:
        return kd, None
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(str(student_dir))
    width = getattr(conf, "dim", None) or conf.hidden_size
    if width == targets.hidden.shape[1]:
        return kd, None
    return kd.model_copy(update={"alpha_hidden": 0.0}), (
        f"alpha_hidden {kd.alpha_hidden:g} not applied: the student is {width} wide, the teacher "
        f"{targets.hidden.shape[1]} (the hidden-state term compares them without a projection)")


