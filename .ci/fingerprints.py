"""Build every stage of a preset in a fresh workdir (no Prefect, no MLflow) and print each stage's
output fingerprint and per-file sha256, as JSON. Two checkouts' outputs compare with --compare:

    python .ci/fingerprints.py --preset smoke --out before.json        # on the old commit
    python .ci/fingerprints.py --preset smoke --out after.json --compare before.json

A refactor that changes no behaviour leaves every fingerprint identical (files that hold wall-clock
measurements, named in the comparison, differ run to run by nature)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.basicConfig(format="%(message)s")
logging.getLogger("tasks").setLevel(logging.INFO)


# Keys of the JSON outputs that hold wall-clock measurements (durations, rates, latencies, dates), or the
# fingerprint of an upstream output that holds them: they differ between two runs of the same code, so
# the comparison drops them (and the workdir's own path) and compares the rest.
TIMING_KEY = re.compile(r"(second|time|elapsed|latency|throughput|per_s|_ms|mfu|speed|started|finished|gflop|"
                        r"_s$|^s$|date|when|created|fingerprint)", re.IGNORECASE)


def _without_timings(value, workdir: str):
    if isinstance(value, dict):
        return {k: _without_timings(v, workdir) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [_without_timings(v, workdir) for v in value]
    return value.replace(workdir, "<workdir>") if isinstance(value, str) else value


def _content_hash(path: Path, workdir: Path) -> str | None:
    """sha256 of a JSON output without its timing keys (None for other files)."""
    if path.suffix != ".json":
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(_without_timings(data, str(workdir)), sort_keys=True).encode()).hexdigest()


def describe(workdir: Path, names) -> dict:
    """{stage: {fingerprint, files: {path: sha256}, content: {path: hash without timings}}} of the finished
    stages of a workdir."""
    from tasks.stage import read_manifest

    out = {}
    for name in names:
        manifest = read_manifest(workdir / name)
        if manifest is not None:
            out[name] = {"fingerprint": manifest["output_fingerprint"],
                         "files": {path: entry["sha256"] for path, entry in manifest["files"].items()},
                         "content": {path: _content_hash(workdir / name / path, workdir) for path in manifest["files"]}}
    return out


def build(preset: str, overrides: list[str], keep: Path | None = None) -> dict:
    from tasks.config import load_config
    from tasks.pipeline import SPECS
    from tasks.stage import run_stage

    cfg, _ = load_config(preset, overrides=["run.progress=false", *overrides])
    records: dict = {}
    with tempfile.TemporaryDirectory(prefix="lightbert-fp-") as tmp:
        if keep is not None:
            tmp = str(keep)
        for name, spec in SPECS.items():
            records[name] = run_stage(spec, cfg, Path(tmp), {u: records[u] for u in spec.upstream})
            print(f"{name}: {records[name].fingerprint}", file=sys.stderr, flush=True)
        return describe(Path(tmp), records)


def compare(before: dict, after: dict) -> int:
    differing = 0  # stages whose outputs differ in more than their timings
    for name in sorted(set(before) | set(after), key=lambda n: list(after).index(n) if n in after else 99):
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            print(f"{name:<13} only in {'after' if b is None else 'before'}")
            differing += 1
            continue
        if b["fingerprint"] == a["fingerprint"]:
            print(f"{name:<13} identical  {a['fingerprint'][:16]}  ({len(a['files'])} files)")
            continue
        files = sorted(p for p in set(b["files"]) | set(a["files"]) if b["files"].get(p) != a["files"].get(p))
        timing_only = [p for p in files if b["content"].get(p) is not None
                       and b["content"].get(p) == a["content"].get(p)]
        # the report's text and plots print the measured latencies: not comparable byte for byte
        measured = [p for p in files if p.endswith((".md", ".png"))]
        rest = [p for p in files if p not in timing_only and p not in measured]
        if not rest:
            print(f"{name:<13} same       but for timings in {', '.join(timing_only + measured)}")
            continue
        differing += 1
        print(f"{name:<13} DIFFERENT  {len(rest)} of {len(a['files'])} files: {', '.join(rest[:8])}"
              + (f" (and timings in {len(timing_only)})" if timing_only else ""))
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="build in this workdir and keep it")
    parser.add_argument("--workdir", type=Path, default=None, help="describe this finished workdir, build nothing")
    args = parser.parse_args()
    if args.workdir is not None:
        from tasks.pipeline import STAGES

        result = describe(args.workdir, STAGES)
    else:
        result = build(args.preset, args.overrides, args.keep)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.compare is not None:
        sys.exit(1 if compare(json.loads(args.compare.read_text(encoding="utf-8")), result) else 0)


if __name__ == "__main__":
    main()
