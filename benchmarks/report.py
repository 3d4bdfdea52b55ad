"""The comparison table of a preset, timed: every stage through evaluate, then the report.

    python benchmarks/report.py [--preset cpu|gpu|smoke] [--workdir DIR] [--fresh] [--set key=value ...]

Runs the stages directly (tasks.stage.run_stage: no Prefect, no MLflow, so it also runs where only torch,
transformers and datasets are installed) in DIR (default ./workdir/bench-<preset>). Finished stages whose
inputs did not change are reused unless --fresh; the evaluate stage is always re-measured. Prints each
stage's time, then the report: per model parameters, MLM accuracy, NSP/SOP accuracy, CPU latency at
batch 1 and its speed-up over the teacher (the baseline, measured in the same process with the same
protocol), GPU throughput when there is a GPU, downstream test accuracy and its retention.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from tasks import albert, cache, corpus, distilbert, evaluate, pairs, teacher, tokenizer  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.stage import run_stage  # noqa: E402

STAGES = (corpus.STAGE, tokenizer.STAGE, pairs.STAGE, teacher.STAGE, cache.STAGE, distilbert.STAGE, albert.STAGE,
          evaluate.STAGE)


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true", help="rebuild every stage")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg, preset = load_config(args.preset, overrides=["run.progress=false", *args.overrides])
    wd = (args.workdir or Path("workdir") / f"bench-{preset}").resolve()
    if args.fresh and wd.exists():
        shutil.rmtree(wd)

    records, times = {}, []
    t_all = time.perf_counter()
    for spec in STAGES:
        t = time.perf_counter()
        rec = run_stage(spec, cfg, wd, {u: records[u] for u in spec.upstream}, force=spec is evaluate.STAGE)
        records[spec.name] = rec
        times.append((spec.name, time.perf_counter() - t, rec.cached))
        print(f"{spec.name:<10} {'reused' if rec.cached else 'built'} in {times[-1][1]:.1f}s", flush=True)
    total = time.perf_counter() - t_all

    report = json.loads((records["evaluate"].dir / "report.json").read_text(encoding="utf-8"))
    proto = report["protocol"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\npreset={preset} workdir={wd} cores={os.cpu_count()} torch threads={torch.get_num_threads()} "
          f"device={device}")
    print(f"stages: {', '.join(f'{n} {s:.1f}s' + (' (reused)' if c else '') for n, s, c in times)}; "
          f"total {total:.1f}s")
    lat = proto["latency"]
    print(f"latency: batch 1, {lat['sentences']} sentences/pass, median of {lat['repeats']} passes, "
          f"{lat['threads']} thread(s), {lat['cpu']}")
    d = proto["downstream"]
    print(f"downstream: {', '.join(d['tasks'])}, {d['epochs']:g} epoch(s), lr {d['learning_rate']:g}, "
          f"seeds {d['seeds']}\n")
    head = (f"{'model':<17}{'params':>9}{'ratio':>7}{'MLM acc':>9}{'NSP acc':>9}{'SOP acc':>9}{'CPU ms':>8}"
            f"{'speed-up':>9}{'GPU seq/s':>11}{'GPU x':>7}{'downstr.':>9}{'retain':>8}{'finetune s':>11}")
    print(head)
    print("-" * len(head))
    for e in report["models"]:
        sp, ret = e["speedup"], e["retention"]
        ft = sum(r["seconds"] for res in e["downstream"].values() for r in res["runs"])
        print(f"{e['name']:<17}{e['parameters'] / 1e6:>8.2f}M{e['parameter_ratio']:>7.2f}{e['mlm_accuracy']:>9.4f}"
              f"{_f(e['nsp_accuracy']):>9}{_f(e['sop_accuracy']):>9}{e['cpu_latency_ms']:>8.2f}"
              f"{sp['cpu_latency']:>8.2f}x{_f(e['gpu_throughput_sequences_per_s'], ',.0f'):>11}"
              f"{_f(sp['gpu_throughput'], '.2f'):>7}{e['downstream_accuracy']:>9.4f}"
              f"{ret['downstream_accuracy']:>8.3f}{ft:>11.1f}")
    b = report["baselines"]
    majority = ", ".join(f"{t}: {i['test_majority_accuracy']:.3f}" for t, i in d["data"].items())
    print(f"\nmajority-class accuracy: NSP {b['nsp_majority_accuracy']:.3f}, SOP {b['sop_majority_accuracy']:.3f}; "
          f"downstream test {majority}")
    print(f"report: {records['evaluate'].dir / 'report.md'}")


if __name__ == "__main__":
    main()
