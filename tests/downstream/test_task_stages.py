"""The task-specific distillation stages on the smoke teacher: the teacher's learning-rate sweep and the
checkpoint it keeps, the task cache (its logits are the saved teacher's, it resumes after kill -9), the
students' runs in both modes, and a task-distilled student beating a random-init one on a tiny task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from tasks import engine
from tasks.config import load_config
from tasks.downstream import data as downstream
from tasks.downstream import finetune
from tasks.pipeline import SPECS, STAGES, stages_until
from tasks.stage import read_manifest, run_stage
from tasks.task_cache import outputs as task_cache
from tasks.task_distill import outputs as task_distill
from tasks.task_teacher import outputs as task_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]
TASK_OVERRIDES = [
    "run.progress=false",
    "distilbert.train.max_steps=20", "distilbert.train.checkpoint_every=0",
    "albert.variants=[scratch]", "albert.train.max_steps=4", "albert.train.checkpoint_every=0",
    "evaluate.downstream.max_train_examples=240", "evaluate.downstream.batch_size=16",
    "evaluate.downstream.max_seq_len=32", "evaluate.downstream.epochs=1", "evaluate.downstream.cpu_threads=1",
    "evaluate.downstream.learning_rates.bert=[5.0e-4, 2.0e-3]",
    "evaluate.downstream.learning_rates.distilbert=[1.0e-3]",
    "evaluate.downstream.learning_rates.albert=[1.0e-3]",
    "evaluate.downstream.distill.cache_examples_per_shard=64",
]


@pytest.fixture(scope="module")
def task_stages(smoke_stages):
    """The smoke stages, then distilbert, albert (scratch) and the three task stages, built once."""

    cfg, _ = load_config("smoke", overrides=TASK_OVERRIDES)
    workdir = smoke_stages["workdir"]
    records = dict(smoke_stages["records"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec in (SPECS[name] for name in stages_until("task_distill")[STAGES.index("distilbert"):]):
            records[spec.name] = run_stage(spec, cfg, workdir, {u: records[u] for u in spec.upstream})
    finally:
        torch.set_num_threads(threads)
    return {"config": cfg, "workdir": workdir, "records": records}


def _predictions(model_dir: Path, data, info, with_types: bool) -> list[int]:
    """The test predictions of a saved classifier, scored afresh."""
    tokenized = finetune.tokenize_task(data, model_dir, 32, with_types)
    model = finetune.load_classifier(model_dir, info["num_labels"], 0.1)
    collate = finetune.TaskCollator(finetune.input_columns(with_types), 0, False)
    logits = finetune.predict_logits(model, tokenized["test"], collate, engine.setup_runtime("fp32"))
    return finetune.to_predictions(logits, False).tolist()


def test_teacher_sweep_keeps_the_checkpoint_chosen_on_validation(task_stages):
    cfg, records = task_stages["config"], task_stages["records"]
    out = records["task_teacher"].dir
    result = task_teacher.load_result(out, "movie-sentences")
    sweep = result["sweep"]
    assert [r["learning_rate"] for r in sweep] == [5e-4, 2e-3]
    best = max(sweep, key=lambda r: r["validation_accuracy"])  # the first of ties, as the stage takes it
    assert result["learning_rate"] == best["learning_rate"] and result["chosen_by"] == "validation accuracy"
    assert result["validation"]["accuracy"] == best["validation_accuracy"]
    # the checkpoint is the best of the validation passes (2 per epoch + the end)
    assert result["validation"]["accuracy"] == max(h["accuracy"] for h in result["history"])
    assert not (out / "movie-sentences" / "sweep").exists()  # the losers are gone
    data, info = downstream.load_tasks(cfg)[0][1:]
    # the saved model is the chosen one: it gives the recorded test predictions
    assert _predictions(task_teacher.model_dir(out, "movie-sentences"), data, info, True) == result["test_predictions"]
    labels = task_teacher.load_task_info(out, "movie-sentences")["labels"]["test"]
    assert result["test"]["accuracy"] == pytest.approx(np.mean(np.array(labels) == result["test_predictions"]))
    manifest = read_manifest(out)
    assert manifest["models"] == [{"path": "movie-sentences/model", "name": "lightbert-teacher-movie-sentences",
                                   "task": "text-classification"}]


def test_task_cache_holds_the_saved_teachers_logits(task_stages):
    cfg, records = task_stages["config"], task_stages["records"]
    targets = task_cache.load_targets(records["task_cache"].dir, "movie-sentences")
    data, info = downstream.load_tasks(cfg)[0][1:]
    assert targets.logits.shape == (len(data["train"]), 2) and targets.hidden is None
    mdir = task_teacher.model_dir(records["task_teacher"].dir, "movie-sentences")
    model = finetune.load_classifier(mdir, 2, 0.1)
    train = finetune.tokenize_task(data, mdir, 32, True)["train"]
    fresh = finetune.predict_logits(model, train, finetune.TaskCollator(finetune.input_columns(True), 0, False),
                                    engine.setup_runtime("fp32"))
    np.testing.assert_allclose(targets.logits, fresh, atol=1e-5)
    assert records["task_cache"].manifest["counts"]["shards"] == -(-len(data["train"]) // 64)
    with pytest.raises(Exception, match="no outputs for task 'glue/rte'"):
        task_cache.load_targets(records["task_cache"].dir, "glue/rte")


def test_task_cache_resumes_after_kill_9(task_stages, tmp_path):
    """One example per shard, killed with SIGKILL once a few shards are recorded: the rerun keeps those
    (checked by sha256) and computes the rest, and ends with the same logits."""
    workdir = task_stages["workdir"]
    overrides = [*TASK_OVERRIDES, "evaluate.downstream.distill.cache_examples_per_shard=1"]
    script = tmp_path / "cache.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pathlib import Path\n"
        "from tasks.config import load_config\nfrom tasks.pipeline import SPECS\n"
        "from tasks.stage import StageRecord, read_manifest, run_stage\n"
        f"cfg, _ = load_config('smoke', overrides={overrides!r})\n"
        f"wd = Path({str(workdir)!r})\n"
        "up = {'task_teacher': StageRecord('task_teacher', wd / 'task_teacher', read_manifest(wd / 'task_teacher'), "
        "True, '')}\n"
        "run_stage(SPECS['task_cache'], cfg, wd, up)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while True:
            progress = list((workdir / ".partial").glob("task_cache-*/progress.json"))
            if progress:
                try:
                    if len(json.loads(progress[0].read_text())["shards"]) >= 3:
                        break
                except (OSError, ValueError):
                    pass  # being replaced
            assert proc.poll() is None, f"the stage ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = progress[0].parent
    written = sorted(p.name for p in partial.rglob("shard-*.safetensors"))
    assert 3 <= len(written) < 240

    cfg, _ = load_config("smoke", overrides=overrides)
    up = {"task_teacher": task_stages["records"]["task_teacher"]}
    record = run_stage(SPECS["task_cache"], cfg, workdir, up)
    assert record.manifest["resumed"] is True and record.manifest["counts"]["shards_kept"] >= 3
    assert record.manifest["counts"]["shards"] == 240
    again = task_cache.load_targets(record.dir, "movie-sentences")
    np.testing.assert_allclose(again.logits, task_cache.load_targets(
        task_stages["records"]["task_cache"].dir, "movie-sentences").logits, atol=1e-5)


def test_students_train_in_both_modes_with_the_same_budget(task_stages):
    cfg, records = task_stages["config"], task_stages["records"]
    out = records["task_distill"].dir
    data, info = downstream.load_tasks(cfg)[0][1:]
    for student, with_types in (("distilbert", False), ("albert-scratch", True)):
        runs = {m: task_distill.load_runs(out, "movie-sentences", student, m, [1]) for m in ("distilled", "hard")}
        assert runs["distilled"][0]["steps"] == runs["hard"][0]["steps"] == 15  # 240 / 16, one epoch
        assert runs["distilled"][0]["learning_rate"] == runs["hard"][0]["learning_rate"] == 1e-3
        assert {"soft_loss", "hard_loss"} <= {k.removeprefix("train_") for k in runs["distilled"][0]["final_losses"]}
        assert "train_soft_loss" not in runs["hard"][0]["final_losses"]
        saved = out / "movie-sentences" / student / "distilled" / "model"
        assert _predictions(saved, data, info, with_types) == runs["distilled"][0]["test_predictions"]
    from transformers import AutoConfig

    saved = out / "movie-sentences" / "distilbert" / "distilled" / "model"
    assert AutoConfig.from_pretrained(str(saved)).id2label == {0: "negative", 1: "positive"}  # the task's words
    names = {m["name"] for m in records["task_distill"].manifest["models"]}
    assert names == {"lightbert-distilbert-movie-sentences", "lightbert-albert-scratch-movie-sentences"}


# ------------------------------------------------------------------------------------------------
# a tiny task on which the teacher's soft labels matter
# ------------------------------------------------------------------------------------------------
def _keyword_task(vocab: list[str], seed: int = 0, n: int = 1200, noise: float = 0.3) -> DatasetDict:
    """label 1 iff the sentence holds one of four positive cue words (else one of four negative ones),
    among 6-10 filler words; a share `noise` of the train labels is flipped, validation and test are clean."""
    rng = np.random.default_rng(seed)
    pos, neg, filler = vocab[:4], vocab[4:8], vocab[8:]
    splits = {}
    for split, count in (("train", n), ("validation", 200), ("test", 400)):
        texts, labels = [], []
        for _ in range(count):
            label = int(rng.integers(0, 2))
            words = list(rng.choice(filler, size=int(rng.integers(6, 11))))
            words.insert(int(rng.integers(0, len(words) + 1)), rng.choice(pos if label else neg))
            if split == "train" and rng.random() < noise:
                label = 1 - label
            texts.append(" ".join(words))
            labels.append(label)
        splits[split] = Dataset.from_dict({"id": [f"{split}{i}" for i in range(count)], "text": texts, "label": labels})
    return DatasetDict(splits)


def test_task_distilled_student_beats_a_random_init_student(task_stages, tmp_path):
    """Same architecture, budget (8 epochs of 300 examples at 5e-4) and seeds: the student initialised from
    the teacher and trained on the fine-tuned teacher's soft labels scores clearly higher on clean test
    labels than a randomly initialised one trained on the (30% noisy) hard labels. Each is its best seed of
    two by validation accuracy, as the evaluate stage selects. Single runs often collapse to one class at
    this scale: measured (seeds 1, 2, 3; test accuracy, distilled against random init) 0.693 / 0.523,
    0.895 / 0.528, 0.508 / 0.508 here; at 2e-3 for 4 epochs the distilled student collapsed on all three
    (0.508, 0.508, 0.518) once the teacher's token type 0 was folded into its positions, and on one of
    three before (0.853, 0.888, 0.508 against 0.603, 0.508, 0.508)."""
    from transformers import AutoTokenizer, DistilBertForMaskedLM

    cfg = task_stages["config"]
    student_dir = task_stages["records"]["distilbert"].dir / "model"
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) >= 4 and not w.startswith("#"))[:60]
    data = _keyword_task(words, n=300, noise=0.3)
    info = {"task": "keywords", "num_labels": 2, "task_type": "classification", "metric": "accuracy"}
    budget = type(cfg.evaluate.downstream)

    def settings(epochs: float):
        return budget(**{**cfg.evaluate.downstream.model_dump(), "epochs": epochs, "batch_size": 32})

    rt = engine.setup_runtime("fp32")
    teacher_dir = task_stages["records"]["teacher"].dir / "model"
    teacher_data = finetune.tokenize_task(data, teacher_dir, 32, True)
    teacher = finetune.fit(teacher_dir, teacher_data, info, settings(8.0), learning_rate=2e-3, seed=1, rt=rt)
    collate = finetune.TaskCollator(finetune.input_columns(True), 0, False)
    targets = finetune.TeacherTargets(logits=finetune.predict_logits(teacher.model, teacher_data["train"], collate, rt))

    random_dir = tmp_path / "random-student"
    torch.manual_seed(0)
    DistilBertForMaskedLM(DistilBertForMaskedLM.from_pretrained(str(student_dir)).config).save_pretrained(random_dir)
    tok.save_pretrained(random_dir)
    student_data = finetune.tokenize_task(data, student_dir, 32, False)

    def best_of_two(model_dir, **kd):
        runs = [finetune.fit(model_dir, student_data, info, settings(8.0), learning_rate=5e-4, seed=seed, rt=rt, **kd)
                for seed in (1, 2)]
        return max(runs, key=lambda r: r.validation["accuracy"])

    distilled = best_of_two(student_dir, targets=targets, kd=cfg.evaluate.downstream.distill)
    scratch = best_of_two(random_dir)
    assert teacher.test["accuracy"] > 0.65, teacher.test  # the teacher learned the rule through the noise
    assert distilled.test["accuracy"] > scratch.test["accuracy"] + 0.05, (distilled.test, scratch.test)


def test_a_local_labelled_file_runs_through_the_task_stages_into_the_report(task_stages, tmp_path):
    """A csv the test writes (string labels, three classes, its own split column) as the downstream task:
    the teacher is fine-tuned on it, cached, the students distilled, and the report scores it with the
    classification metrics of tasks/scoring.py."""
    import csv

    from tasks.config import load_config

    rng = np.random.default_rng(0)
    cues = {"praise": "superb", "complaint": "awful", "question": "why"}
    path = tmp_path / "tickets.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["message", "kind", "fold"])
        for i in range(240):
            kind = list(cues)[i % 3]
            words = ["the", "order", "was", "late", "again", "today"]
            words.insert(int(rng.integers(0, 6)), cues[kind])
            writer.writerow([" ".join(words), kind, "test" if i % 6 == 0 else "dev" if i % 6 == 1 else "train"])
    task = f"{{name: tickets, path: '{path}', text_column: message, label_column: kind, split_column: fold}}"
    cfg, _ = load_config("smoke", overrides=[*TASK_OVERRIDES, f"evaluate.downstream.tasks=[{task}]",
                                             "evaluate.downstream.learning_rates.bert=[2.0e-3]",
                                             "evaluate.downstream.epochs=3", "evaluate.latency_sentences=4",
                                             "evaluate.latency_repeats=1", "evaluate.plots=false",
                                             "export.models=[lightbert-distilbert-tickets]"])
    workdir = tmp_path / "wd"
    records = {k: v for k, v in task_stages["records"].items()
               if k in ("pairs", "teacher", "distilbert", "albert")}
    for spec in (SPECS[name] for name in STAGES[STAGES.index("task_teacher"):]):
        records[spec.name] = run_stage(spec, cfg, workdir, {u: records[u] for u in spec.upstream})
    report = json.loads((records["evaluate"].dir / "report.json").read_text())
    info = report["protocol"]["downstream"]["data"]["tickets"]
    assert info["label_names"] == ["complaint", "praise", "question"] and info["counts"]["test"] == 40
    teacher = report["models"][0]["downstream"]["tickets"]
    assert teacher["metric"] == "accuracy" and set(teacher["modes"]["finetuned"]["test"]) == {"accuracy", "macro_f1"}
    students = {e["name"]: e["downstream"]["tickets"] for e in report["models"][1:]}
    assert set(students) == {"distilbert", "albert-scratch"}
    for res in students.values():
        assert set(res["modes"]) == {"distilled", "hard"} and res["gain"]["seeds"] == [1]
    assert "## tickets: test accuracy" in (records["evaluate"].dir / "report.md").read_text()
