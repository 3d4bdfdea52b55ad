"""Task-distillation training speed: the fine-tuned teacher's logits read from the task cache vs the
teacher run online in every step, for the same student, in one process.

    python benchmarks/task_distill.py [--preset cpu|gpu|smoke] [--examples N] [--steps N] [--threads N]

The teacher has the preset's teacher shape (cpu: all-MiniLM-L6-v2's 6 x 384, vocabulary 30,522; weights
do not change the cost, so they are random and nothing is downloaded) with a 2-label classifier; the
student is the preset's DistilBERT (half the teacher's layers, initialised from it). N synthetic
sentences with movie-sentences' length profile (10-50 tokens). The cached path first runs the teacher
once over the examples (its time is printed: it is paid once per task, not per student or epoch), then
trains the student through tasks/downstream/finetune.py's loss on the cached logits; the online path trains the
same student with the teacher's forward inside every step. Prints student training tokens/s of each
and their ratio, beside the machine's measured fp32 matmul speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertForSequenceClassification, DistilBertForSequenceClassification  # noqa: E402

from benchmarks.teacher_cache import print_machine, timed_training  # noqa: E402
from models.bert import bert_config, build_bert_for_pretraining  # noqa: E402
from models.distilbert import build_student, init_student_from_teacher, resolve_layer_map  # noqa: E402
from tasks import engine  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.downstream import finetune  # noqa: E402

DEFAULTS = {"cpu": {"examples": 1024, "steps": 20}, "gpu": {"examples": 16384, "steps": 100},
            "smoke": {"examples": 512, "steps": 20}}
MINILM = {"hidden_size": 384, "num_layers": 6, "num_heads": 12, "intermediate_size": 1536, "vocab": 30522}


def synthetic_task(n: int, vocab: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 51, n)
    ids = [[2, *rng.integers(5, vocab, int(length) - 2).tolist(), 3] for length in lengths]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                              "labels": rng.integers(0, 2, n).tolist(), "length": lengths.tolist(),
                              finetune.ROW: list(range(n))})


def main() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=tuple(DEFAULTS))
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per path")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, preset = load_config(args.preset, overrides=["run.progress=false"])
    n = args.examples or DEFAULTS[preset]["examples"]
    steps = args.steps or DEFAULTS[preset]["steps"]
    t = cfg.teacher
    shape = MINILM if t.pretrained else {"hidden_size": t.hidden_size, "num_layers": t.num_layers,
                                         "num_heads": t.num_heads, "intermediate_size": t.intermediate_size,
                                         "vocab": cfg.tokenizer.vocab_size}
    torch.manual_seed(0)
    pretraining = build_bert_for_pretraining(bert_config(shape["vocab"], shape["hidden_size"], shape["num_layers"],
                                                         shape["num_heads"], shape["intermediate_size"], 512, 0, 0.1))
    layer_map = resolve_layer_map(shape["num_layers"], cfg.distilbert.num_layers, cfg.distilbert.layer_map)
    student_mlm = build_student(pretraining.config, len(layer_map), cfg.distilbert.dropout)
    init_student_from_teacher(pretraining, student_mlm, layer_map)
    teacher = BertForSequenceClassification(pretraining.config.__class__(**{**pretraining.config.to_dict(),
                                                                            "num_labels": 2}))
    teacher.bert.load_state_dict(pretraining.bert.state_dict(), strict=False)
    student = DistilBertForSequenceClassification(student_mlm.config.__class__(**{**student_mlm.config.to_dict(),
                                                                                  "num_labels": 2}))
    student.distilbert.load_state_dict(student_mlm.distilbert.state_dict())
    rt = engine.setup_runtime("auto")
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"cpu x {torch.get_num_threads()}"
    dcfg, kd = cfg.evaluate.downstream, cfg.evaluate.downstream.distill
    print(f"preset={preset}: teacher {shape['num_layers']} x {shape['hidden_size']} "
          f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M), student {len(layer_map)} layers {layer_map} "
          f"({sum(p.numel() for p in student.parameters()) / 1e6:.1f} M), {n:,} synthetic sentences; device {device}, "
          f"{rt.precision}; batch {dcfg.batch_size}, {steps} timed steps per path; loss {kd.alpha_ce} T^2 KL + {kd.alpha_hard} CE at T {kd.temperature}")
    print_machine(rt)

    data = synthetic_task(n, shape["vocab"])
    teacher.eval().to(rt.device)
    columns = finetune.input_columns(False)
    t0 = time.perf_counter()
    logits = finetune.predict_logits(teacher, data, finetune.TaskCollator(columns, 0, False), rt)
    cache_seconds = time.perf_counter() - t0
    print(f"teacher over the {n:,} examples (the task cache's work, once per task): {cache_seconds:.1f} s")

    train_cfg = cfg.teacher.train.model_copy(update={
        "max_steps": steps, "batch_size": dcfg.batch_size, "effective_batch_size": dcfg.batch_size,
        "learning_rate": dcfg.learning_rates.distilbert[0], "warmup_steps": 1, "checkpoint_every": 0,
        "eval_every": 0, "log_every": max(1, steps // 5)})
    cached_fn = finetune.make_loss_fn(False, kd)
    cached = finetune.TaskCollator(columns, 0, False, finetune.TeacherTargets(logits=logits))
    tok_cached, mfu_cached = timed_training(student, cached_fn, data, cached, train_cfg, rt)

    def online_fn(model, batch):
        with torch.no_grad():
            batch = {**batch, "teacher_logits": teacher(input_ids=batch["input_ids"],
                                                        attention_mask=batch["attention_mask"]).logits.float()}
        return cached_fn(model, batch)

    plain = finetune.TaskCollator(columns, 0, False)
    tok_online, mfu_online = timed_training(student, online_fn, data, plain, train_cfg, rt)

    def mfu(x: float | None) -> str:
        return f", MFU {100 * x:.1f}%" if x is not None else ""

    print("\nstudent task-distillation training, tokens/s (real tokens over training time):")
    print(f"  {'cached teacher (logits read from the task cache)':<64}{tok_cached:>10,.0f}{mfu(mfu_cached)}")
    print(f"  {'online teacher (its forward in every step)':<64}{tok_online:>10,.0f}{mfu(mfu_online)}")
    print(f"  ratio cached / online: {tok_cached / tok_online:.2f}x")


if __name__ == "__main__":
    main()
