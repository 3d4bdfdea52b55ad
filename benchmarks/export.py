"""Deployable students: the latency and throughput of every exported model x variant (PyTorch fp32, ONNX
Runtime fp32, ONNX Runtime int8, PyTorch int8), measured side by side in one interleaved run, with each
classifier's accuracy on its task's test split, and the issue's targets checked.

    python benchmarks/export.py --workdir WD [--config WD/config.yaml] [--threads 1] [--repeats 5]
                                [--sentences 200] [--models NAME ...]

WD holds a finished export stage (`lightbert run --until export`, or any full run); the configuration
names the downstream tasks (the resolved config.yaml every run writes into its workdir). The measures are
tasks/evaluate/variants.py's, the evaluate stage's own. Targets (the cpu preset's, issue 14): the int8
ONNX DistilBERT classifier at least 3x faster at batch 1 than the fp32 PyTorch teacher classifier of the
same task, and within 1 point of the fp32 DistilBERT classifier's test metric. Printed beside the machine's
measured fp32 matmul speed and the thread count; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import yaml  # noqa: E402

from tasks import engine  # noqa: E402
from tasks.config import validate_config  # noqa: E402
from tasks.downstream import data as downstream  # noqa: E402
from tasks.evaluate import variants  # noqa: E402
from tasks.evaluate.build import cpu_name  # noqa: E402

SPEEDUP_TARGET = 3.0  # int8 ONNX student vs fp32 PyTorch teacher, batch 1
ACCURACY_LOSS_TARGET = 0.01  # at most 1 point below the fp32 student


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None, help="resolved configuration (default WD/config.yaml)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--student", default="distilbert")
    ap.add_argument("--models", nargs="*", default=None, help="registry names to time (default: every exported "
                    "model), e.g. lightbert-teacher-movie-sentences lightbert-distilbert-movie-sentences")
    args = ap.parse_args()
    export_dir = args.workdir / "export"
    if not (export_dir / "manifest.json").is_file():
        sys.exit(f"{export_dir} holds no finished export stage; run `lightbert run --until export --workdir "
                 f"{args.workdir}` first")
    config = args.config or args.workdir / "config.yaml"
    cfg = validate_config(yaml.safe_load(config.read_text(encoding="utf-8")))
    tasks = downstream.load_tasks(cfg)
    task_data = {name: (data, info) for name, data, info in tasks}
    first = tasks[0]
    sentences = list(first[1]["validation"]["text"])[: args.sentences]
    machine = {"cpu": cpu_name(), "matmul_gflops": engine.matmul_gflops(args.threads)}
    print(f"machine: {machine['cpu']}, fp32 matmul {machine['matmul_gflops']:.1f} GFLOP/s on {args.threads} "
          f"thread(s) (2048x2048)")
    deployment = variants.measure_deployment(export_dir, sentences, f"{first[0]} validation", task_data, args.threads,
                                             args.repeats, 32, cfg.evaluate.downstream.max_seq_len,
                                             cfg.evaluate.downstream.bootstrap_resamples, machine, only=args.models)
    print("\n".join(variants.deployment_markdown(deployment)))

    missed = []
    for task in task_data:
        rows = {(r["model"], r["variant"]): r for r in deployment["rows"] if r["task"] == task}
        int8, fp32 = rows.get((args.student, "onnx-int8")), rows.get((args.student, "pytorch-fp32"))
        if int8 is None or fp32 is None or int8["speedup"] is None:
            missed.append(f"{task}: no exported {args.student} and teacher classifiers to compare")
            continue
        metric = int8["metric"]
        loss = fp32["test"][metric] - int8["test"][metric]
        print(f"{task}: {args.student} ONNX int8 vs the fp32 PyTorch teacher at batch 1: {int8['speedup']:.2f}x "
              f"(target >= {SPEEDUP_TARGET:g}x); {metric} {int8['test'][metric]:.4f} "
              f"[{int8['test_ci95'][0]:.3f}, {int8['test_ci95'][1]:.3f}] against the fp32 {args.student}'s "
              f"{fp32['test'][metric]:.4f} [{fp32['test_ci95'][0]:.3f}, {fp32['test_ci95'][1]:.3f}]: "
              f"{-loss:+.4f} (target >= {-ACCURACY_LOSS_TARGET:+g})")
        if int8["speedup"] < SPEEDUP_TARGET:
            missed.append(f"{task}: speed-up {int8['speedup']:.2f}x < {SPEEDUP_TARGET:g}x")
        if loss > ACCURACY_LOSS_TARGET:
            missed.append(f"{task}: {metric} loss {loss:.4f} > {ACCURACY_LOSS_TARGET:g}")
    if missed:
        print("targets missed: " + "; ".join(missed))
        return 1
    print("targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
