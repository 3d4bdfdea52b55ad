"""The comparison table of a preset, timed: every stage through evaluate, then the report.

    python benchmarks/report.py [--preset cpu|gpu|smoke] [--workdir DIR] [--fresh] [--set key=value ...]

Runs the stages directly (tasks.stage.run_stage: no Prefect, no MLflow, so it also runs where only torch,
transformers and datasets are installed) in DIR (default ./workdir/bench-<preset>). Finished stages whose
inputs did not change are reused unless --fresh; the evaluate stage is always re-measured. Prints each
stage's time, then the report: per model parameters, MLM accuracy, NSP/SOP accuracy, CPU latency at
batch 1 and its speed-up over the teacher (the baseline, measured in the same process with the same
protocol), GPU throughput when there is a GPU, and per task the test metric of the fine-tuned teacher and
of each student task-distilled and on hard labels alone, the gain with its paired 95% interval, and the
retention; with the machine's measured matmul speed.
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

from tasks.config import load_config  # noqa: E402
from tasks.pipeline import SPECS  # noqa: E402
from tasks.stage import run_stage  # noqa: E402

STAGES = tuple(SPECS.values())


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
        rec = run_stage(spec, cfg, wd, {u: records[u] for u in spec.upstream}, force=spec is SPECS["evaluate"])
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
    m = report["machine"]
    print(f"machine: {m['cpu']}, fp32 matmul {m['matmul_gflops']:.0f} GFLOP/s on {m['matmul_threads']} threads")
    lat = proto["latency"]
    print(f"latency: batch 1, {lat['sentences']} sentences/pass, median of {lat['repeats']} passes, "
          f"{lat['threads']} thread(s)")
    d = proto["downstream"]
    print(f"downstream: {', '.join(d['tasks'])}, epochs {d['epochs']}, learning rates {d['learning_rates']}, "
          f"seeds {d['seeds']}\n")
    for task in d["tasks"]:
        head = (f"{'model':<17}{'params':>9}{'ratio':>7}{'CPU ms':>8}{'speed-up':>9}{'GPU x':>7}"
                f"{'distilled':>11}{'hard':>8}{'gain':>8}{'gain 95% CI':>18}{'retain':>8}")
        print(f"{task} (test {d['data'][task]['metric']}):")
        print(head)
        print("-" * len(head))
        for e in report["models"]:
            res = e["downstream"][task]
            sp, ret, modes = e["speedup"], e["retention"], res["modes"]
            metric = res["metric"]

            def score(mode, metric=metric):
                return "-" if mode is None else ("collapsed" if mode["collapsed"] else f"{mode['test'][metric]:.4f}")

            first = modes.get("distilled") or modes.get("finetuned")
            gain = res["gain"]
            ci = f"[{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}]" if gain else "-"
            print(f"{e['name']:<17}{e['parameters'] / 1e6:>8.2f}M{e['parameter_ratio']:>7.2f}{e['cpu_latency_ms']:>8.2f}"
                  f"{sp['cpu_latency']:>8.2f}x{_f(sp['gpu_throughput'], '.2f'):>7}{score(first):>11}"
                  f"{score(modes.get('hard')):>8}{_f(gain and gain['difference'], '+.3f'):>8}{ci:>18}"
                  f"{_f(ret.get(f'downstream/{task}')):>8}")
        print()
    print(f"report: {records['evaluate'].dir / 'report.md'}")


if __name__ == "__main__":
    main()
