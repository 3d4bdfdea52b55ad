"""Throughput of the data stages (corpus, tokenizer, pairs) on the embedded corpus.

    python benchmarks/data_stages.py [--preset cpu] [--set key=value ...] [--workdir DIR]

Runs the stages directly (no Prefect, no MLflow) in a fresh workdir, after fetching the embedded
sources into the download cache first, so the fetch is not counted. Prints documents/s, tokens/s and
examples/s per stage, and the corpus-through-pairs total against the 2-minute target of the cpu preset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.teacher_cache import print_machine  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.pipeline import SPECS, stages_until  # noqa: E402
from tasks.stage import run_stage  # noqa: E402

TARGET_S = 120.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    cfg, preset = load_config(args.preset, overrides=["run.progress=false", *args.overrides])

    with tempfile.TemporaryDirectory(prefix="lightbert-bench-") as tmp:
        # Warm the download cache (the fetch is excluded from the figures).
        t = time.perf_counter()
        run_stage(SPECS["corpus"], cfg, Path(tmp) / "warm", {})
        print(f"fetch + first corpus build (warm-up, not counted): {time.perf_counter() - t:.1f}s")

        wd = args.workdir or Path(tmp) / "bench"
        records, rows = {}, []
        for spec in (SPECS[name] for name in stages_until("pairs")):
            t = time.perf_counter()
            rec = run_stage(spec, cfg, wd, {u: records[u] for u in spec.upstream}, force=True)
            seconds = time.perf_counter() - t
            records[spec.name] = rec
            rows.append((spec.name, seconds, rec.manifest["counts"]))

    print(f"\npreset={preset} num_proc={cfg.run.resolved_num_proc()} cores={os.cpu_count()}")
    print_machine()
    print(f"{'stage':<10} {'seconds':>8}  throughput")
    c = rows[0][2]
    p = rows[2][2]
    docs = c.get("documents_train", 0) + c.get("documents_validation", 0)
    tok_train = p.get("tokens_train", 0)
    examples = p.get("examples_train", 0) + p.get("examples_validation", 0)
    rates = {
        "corpus": f"{docs / rows[0][1]:,.0f} documents/s ({c.get('characters', 0) / rows[0][1] / 1e6:.2f} M chars/s)",
        "tokenizer": f"{c.get('sentences', 0) / rows[1][1]:,.0f} sentences/s (vocab {rows[1][2].get('vocab_size')})",
        "pairs": f"{examples / rows[2][1]:,.0f} examples/s, {tok_train / rows[2][1]:,.0f} tokens/s",
    }
    for name, seconds, _ in rows:
        print(f"{name:<10} {seconds:8.1f}  {rates[name]}")
    total = sum(r[1] for r in rows)
    print(f"{'total':<10} {total:8.1f}  corpus->pairs; target {TARGET_S:.0f}s -> ratio {total / TARGET_S:.2f} "
          f"({'within' if total <= TARGET_S else 'OVER'} target)")


if __name__ == "__main__":
    main()
