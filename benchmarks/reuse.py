"""A fully reused `lightbert run` over a large workdir: how long the reuse check takes, against hashing.

    python benchmarks/reuse.py [--gigabytes 10] [--workdir DIR]

Builds the smoke preset's corpus and tokenizer stages with the real CLI (Prefect + MLflow), then pads the
tokenizer stage with `--gigabytes` of random files, recorded in its manifest as the stage itself would
record them (size, sha256, mtime and inode), so the workdir holds that much finished output. Then it
times, in this process's order:
  - `lightbert run --until tokenizer` again: every stage reused, checked by size, mtime and inode;
  - the same check done the old way, re-hashing every file (tasks.artifacts.verify_tree);
  - `lightbert verify`, which re-hashes on demand.
The run's own time includes Prefect's and MLflow's start-up; the check's time is printed apart.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.teacher_cache import print_machine  # noqa: E402
from tasks.artifacts import STAT_KEYS, atomic_write_json, hash_tree, sha256_json, verify_tree  # noqa: E402
from tasks.stage import MANIFEST, check_stage, read_manifest  # noqa: E402

CHUNK = 64 * 1024 * 1024


def lightbert(*args: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "lightbert"), *args], env=env, capture_output=True,
                          text=True, timeout=3600)
    return time.perf_counter() - t0, done


def pad_stage(stage_dir: Path, gigabytes: float) -> int:
    """Random files under <stage>/padding/, listed in the manifest as if the stage had written them."""
    folder = stage_dir / "padding"
    folder.mkdir(exist_ok=True)
    total, n = int(gigabytes * 2**30), 0
    while n * 2**30 < total:
        with open(folder / f"part-{n:03d}.bin", "wb") as f:
            for _ in range(min(2**30, total - n * 2**30) // CHUNK):
                f.write(os.urandom(CHUNK))
        n += 1
    manifest = read_manifest(stage_dir)
    hashed = hash_tree(stage_dir, exclude=(MANIFEST,), with_stat=True)  # as tasks.stage.run_stage records it
    files = {rel: {"size": e["size"], "sha256": e["sha256"]} for rel, e in hashed.items()}
    manifest["files"] = files
    manifest["file_stats"] = {rel: {key: e[key] for key in STAT_KEYS} for rel, e in hashed.items()}
    manifest["output_fingerprint"] = sha256_json(files)
    atomic_write_json(stage_dir / MANIFEST, manifest)
    return sum(f["size"] for f in files.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gigabytes", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory(prefix="lightbert-reuse-") as tmp:
        wd = args.workdir or Path(tmp) / "wd"
        env = dict(os.environ, PREFECT_HOME=str(Path(tmp) / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   LIGHTBERT_NO_BROWSER="1")
        run = ("run", "--preset", "smoke", "--workdir", str(wd), "--until", "tokenizer")
        seconds, done = lightbert(*run, env=env)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        print(f"  built corpus and tokenizer in {seconds:.1f}s")
        size = pad_stage(wd / "tokenizer", args.gigabytes)
        print(f"  workdir: {size / 2**30:.1f} GiB of finished output in the tokenizer stage")

        manifest = read_manifest(wd / "tokenizer")
        t0 = time.perf_counter()
        ok, reason = check_stage(wd / "tokenizer", manifest["key_parts"])
        check_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        problem = verify_tree(wd / "tokenizer", manifest["files"])
        hash_s = time.perf_counter() - t0
        assert ok and problem is None, (reason, problem)

        seconds, done = lightbert(*run, env=env)
        reused = done.returncode == 0 and done.stdout.count("(built earlier") + done.stderr.count("cached") > 0
        verify_s, verified = lightbert("verify", "--workdir", str(wd), env=env)
        print(f"  reuse check of the padded stage (size, mtime, inode): {check_s * 1000:.1f} ms")
        print(f"  the same check by re-hashing every file:             {hash_s:.1f} s "
              f"({size / 2**30 / hash_s:.2f} GiB/s)  -> {hash_s / max(check_s, 1e-9):,.0f}x")
        print(f"  `lightbert run` with every stage reused:              {seconds:.1f} s "
              f"(Prefect and MLflow start-up included; reused: {reused})")
        print(f"  `lightbert verify` (re-hashes on demand):             {verify_s:.1f} s, exit {verified.returncode}")


if __name__ == "__main__":
    main()
