"""The data stages at scale: seconds, tokens/s and peak memory of corpus, tokenizer and pairs on synthetic
corpora of 10 M, 100 M, 1 B ... tokens, and the ratio against another commit on the same input.

    python benchmarks/scale.py [--tokens 10M] [--tokens 100M ...] [--baseline 07c2c98] [--num-proc 1]
                               [--stages corpus,tokenizer,pairs] [--root DIR] [--keep]
    python benchmarks/scale.py --tokens 2.2B --stages pairs --reuse-corpus   # past 2^31 tokens

The synthetic corpus is the embedded text (enwiki-sample and bbc-news, about 1.75 M tokens) written again
and again into .txt files, each copy with the sentences of every document shuffled (seeded) so that the
corpus stage's de-duplication keeps it. Each stage runs alone in a fresh process (tasks.stage.run_stage,
no Prefect or MLflow), after its upstream stages were built by an earlier process; its seconds are the
stage's own (the manifest's timing, so the baseline's slower reuse check of the upstream outputs is not
counted) and its memory is sampled from /proc for that process and its workers (TreeMemory).
The baseline commit is checked out into a git worktree beside the repository and runs the same stages on
the same corpus with the same settings: the cpu preset of 07c2c98 (vocabulary 8000, 128-token pairs, one
copy). With --reuse-corpus the corpus stage's output is replicated instead of rebuilt (for sizes whose
corpus stage would take hours): the pairs stage reads it as it would the corpus stage's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("corpus", "tokenizer", "pairs")
SETTINGS = ["run.progress=false", "run.seed=42", "corpus.validation_fraction=0.05", "tokenizer.vocab_size=8000",
            "pairs.max_seq_len=128", "pairs.dupe_factor=1", "teacher.pretrained=null"]
REPLICATED = "REPLICATED"  # marks a workdir whose corpus and tokenizer prepare_replicated made
EMBEDDED_TOKENS = 1.75e6  # tokens of one copy of the embedded text (train + validation, vocabulary 8000)


def parse_tokens(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


# ------------------------------------------------------------------------------------------------
# one stage in a fresh process (the child)
# ------------------------------------------------------------------------------------------------
def child(code: Path, stage: str, workdir: Path, overrides: list[str]) -> None:
    sys.path.insert(0, str(code))
    os.chdir(code)
    from tasks.config import load_config
    from tasks.stage import run_stage

    # Older commits kept the registry in flows/. Decided by the file, not by an ImportError: an editable
    # install's finder would find this checkout's tasks/pipeline.py for a tree that has none.
    if (code / "tasks" / "pipeline.py").is_file():
        from tasks.pipeline import SPECS
    else:
        from flows.stages import SPECS
    from tasks.stage import StageRecord, read_manifest

    cfg, _ = load_config(None, overrides=overrides)
    order = list(SPECS)
    records: dict = {}
    for name in order[:order.index(stage) + 1]:
        spec = SPECS[name]
        if (workdir / REPLICATED).is_file() and name in ("corpus", "tokenizer"):  # made by prepare_replicated
            records[name] = StageRecord(name, workdir / name, read_manifest(workdir / name), cached=True,
                                        reason="replicated")
            continue
        records[name] = run_stage(spec, cfg, workdir, {u: records[u] for u in spec.upstream})
    manifest = records[stage].manifest
    print("RESULT " + json.dumps({"counts": manifest.get("counts", {}), "seconds": manifest["timings"]["seconds"],
                                  "cached": records[stage].cached}))


def run_measured(code: Path, stage: str, workdir: Path, overrides: list[str]) -> dict:
    """Run one stage in a fresh process; its result, wall time and its process tree's memory (TreeMemory)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(code), stage, str(workdir), json.dumps(overrides)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(code)}
    out_path = workdir.parent / f".{workdir.name}-{stage}.out"
    with open(out_path, "w") as out, open(out_path.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=code)
        t0 = time.perf_counter()
        sampler = TreeMemory(proc.pid, trace=workdir.parent / f".{workdir.name}-{stage}.mem")
        sampler.start()
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out_path.read_text().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = out_path.with_suffix(".err").read_text()[-3000:]
        raise SystemExit(f"{stage} at {code} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(wall_seconds=wall, **sampler.peaks())
    return result


class TreeMemory(threading.Thread):
    """Samples /proc of a process and its descendants every `every` seconds. Peak RSS is the largest
    VmHWM (the kernel's own high-water mark of a process's resident set) of any process of the tree;
    anon is the peak over time of the tree's summed anonymous memory (RssAnon: heap and arrays, what
    memory pressure is made of); mapped is the largest file-backed resident set (RssFile: memory-mapped
    files, which the kernel can drop and re-read). Not wait4's ru_maxrss: a child started with vfork
    and exec (subprocess does) inherits its parent's high-water mark there, so a benchmark process
    that had grown to 4 GiB preparing a corpus reported 4 GiB for every stage it ran afterwards. With
    `trace`, every sample is written there (seconds, MiB anon, MiB mapped, then pid:anon:mapped)."""

    def __init__(self, pid: int, every: float = 0.25, trace: Path | None = None):
        super().__init__(daemon=True)
        self.pid, self.every, self.trace = pid, every, trace
        self.hwm_peak = self.anon_peak = self.file_peak = 0
        self._done = threading.Event()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return out

    @staticmethod
    def _status(pid: int) -> tuple[int, int, int]:
        """(VmHWM, RssAnon, RssFile) in KiB; zeros for a process that has gone."""
        want = {"VmHWM:": 0, "RssAnon:": 0, "RssFile:": 0}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0] + ":"
                    if key in want:
                        want[key] = int(line.split()[1])
        except OSError:
            pass
        return want["VmHWM:"], want["RssAnon:"], want["RssFile:"]

    def sample(self) -> str:
        tree = self._tree(self.pid)
        sizes = [self._status(p) for p in tree]
        anon, file = sum(a for _, a, _ in sizes), max((f for _, _, f in sizes), default=0)
        self.hwm_peak = max([self.hwm_peak, *(h for h, _, _ in sizes)])
        self.anon_peak, self.file_peak = max(self.anon_peak, anon), max(self.file_peak, file)
        each = " ".join(f"{p}:{a // 1024}:{f // 1024}" for p, (_, a, f) in zip(tree, sizes, strict=True))
        return f"{anon / 1024:.0f} {file / 1024:.0f} {each}"

    def run(self) -> None:
        t0 = time.perf_counter()
        log = open(self.trace, "w") if self.trace else None  # noqa: SIM115 - closed below
        try:
            while not self._done.wait(self.every):
                line = self.sample()
                if log:
                    log.write(f"{time.perf_counter() - t0:.2f} {line}\n")
        finally:
            if log:
                log.close()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def peaks(self) -> dict[str, float]:
        return {"peak_rss_mib": self.hwm_peak / 1024, "peak_anon_mib": self.anon_peak / 1024,
                "peak_file_mib": self.file_peak / 1024}


# ------------------------------------------------------------------------------------------------
# the synthetic corpus
# ------------------------------------------------------------------------------------------------
def embedded_documents(root: Path) -> list[list[str]]:
    """The embedded corpora's documents (sentences), through this repository's corpus stage."""
    sys.path.insert(0, str(REPO))
    from datasets import load_from_disk

    from tasks.config import load_config
    from tasks.pipeline import SPECS
    from tasks.stage import run_stage

    cfg, _ = load_config(None, overrides=[*SETTINGS, "corpus.sources=[enwiki-sample, bbc-news]",
                                          "corpus.validation_fraction=0.0"])
    rec = run_stage(SPECS["corpus"], cfg, root / "embedded", {})
    return list(load_from_disk(str(rec.dir / "train"))["sentences"])


def write_corpus(folder: Path, documents: list[list[str]], tokens: int) -> int:
    """Copies of the documents, sentences shuffled per copy, one .txt file per copy (documents apart by
    a blank line), until about `tokens` tokens; returns the copies written."""
    copies = max(1, round(tokens / EMBEDDED_TOKENS))
    if (folder / "DONE").is_file() and int((folder / "DONE").read_text()) == copies:
        return copies
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for c in range(copies):
        rng = random.Random(c)
        with open(folder / f"copy-{c:05d}.txt", "w", encoding="utf-8") as f:
            for doc in documents:
                sentences = list(doc)
                if c:
                    rng.shuffle(sentences)
                f.write(" ".join(sentences) + "\n\n")
    (folder / "DONE").write_text(str(copies))
    return copies


def replicate_corpus(source: Path, target: Path, copies: int) -> None:
    """A corpus stage output of `copies` times the source's documents (sentences shuffled per copy),
    written split by split in bounded memory; its manifest is the source's, so later stages reuse it."""
    import datasets
    from datasets import concatenate_datasets, load_from_disk

    datasets.disable_progress_bars()
    for split in ("train", "validation"):
        ds = load_from_disk(str(source / split))
        parts = []
        for c in range(copies):
            rng = random.Random(c)

            def shuffled(batch, rng=rng, c=c):
                out = [rng.sample(s, len(s)) if c else s for s in batch["sentences"]]
                return {"sentences": out, "id": [f"{i}-{c}" for i in batch["id"]]}

            parts.append(ds.map(shuffled, batched=True, keep_in_memory=False, desc=None,
                                cache_file_name=str(target.parent / f".rep-{split}-{c}.arrow")))
        concatenate_datasets(parts).save_to_disk(str(target / split))
        del parts
        for f in target.parent.glob(f".rep-{split}-*.arrow"):
            f.unlink()


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def baseline_tree(commit: str, root: Path) -> Path:
    tree = root / f"tree-{commit}"
    if not (tree / "tasks").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
    return tree


def stage_tokens(stage: str, counts: dict, corpus_tokens: int) -> int:
    if stage == "pairs":
        return int(counts.get("tokens_train", 0) + counts.get("tokens_validation", 0))
    return corpus_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", action="append", default=None, help="corpus size: 10M, 100M, 1B (repeatable)")
    ap.add_argument("--baseline", default="07c2c98", help="commit to compare with; 'none' to skip")
    ap.add_argument("--baseline-max-tokens", default="100M", help="skip the baseline above this size")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--num-proc", type=int, default=1, help="worker processes (per-core figures with 1)")
    ap.add_argument("--reuse-corpus", action="store_true", help="replicate the 10 M corpus stage output instead "
                    "of running the corpus stage (pairs only)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/lightbert-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the workdirs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, after the settings")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        code, stage, workdir, overrides = args.child
        return child(Path(code), stage, Path(workdir), json.loads(overrides))

    sys.path.insert(0, str(REPO))
    from benchmarks.teacher_cache import print_machine

    args.root.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    sizes = [parse_tokens(t) for t in (args.tokens or ["10M"])]
    print_machine()
    print(f"num_proc {args.num_proc}, cores {os.cpu_count()}; settings: {' '.join(SETTINGS[1:] + args.overrides)}\n")
    documents = embedded_documents(args.root)
    trees = {}  # the baseline first: this commit's rows print their ratios against it
    if args.baseline != "none":
        trees[args.baseline] = baseline_tree(args.baseline, args.root)
    trees["this"] = REPO
    header = f"{'tokens':>8} {'stage':<10} {'code':<8} {'seconds':>9} {'tokens/s':>11} {'peak RSS MiB':>13} {'anon MiB':>9} {'mapped MiB':>10} {'speed x':>8} {'RSS x':>6}"
    print(header)
    base: dict = {}  # (size, stage) -> the baseline's result
    for size in sizes:
        folder = args.root / f"text-{size}"
        copies = write_corpus(folder, documents, size) if not args.reuse_corpus else max(1, round(size / EMBEDDED_TOKENS))
        overrides = [*SETTINGS, f"corpus.sources=[{{path: '{folder}', txt_documents: blank_line}}]",
                     f"run.num_proc={args.num_proc}", *args.overrides]
        for name, code in trees.items():
            if name != "this" and (args.reuse_corpus or size > parse_tokens(args.baseline_max_tokens)):
                continue
            workdir = args.root / f"work-{name}-{size}"
            if args.reuse_corpus:
                prepare_replicated(args.root, code, workdir, overrides, copies, documents)
            results = {}
            for stage in stages:
                r = run_measured(code, stage, workdir, overrides)
                results[stage] = r
                tokens = stage_tokens(stage, r["counts"], int(copies * EMBEDDED_TOKENS))
                baseline = base.get((size, stage))
                ratio = f"{baseline['seconds'] / r['seconds']:>8.2f} {r['peak_rss_mib'] / baseline['peak_rss_mib']:>6.2f}" \
                    if baseline and name == "this" else f"{'':>8} {'':>6}"
                print(f"{size / 1e6:>7.0f}M {stage:<10} {name[:8]:<8} {r['seconds']:>9.1f} {tokens / r['seconds']:>11,.0f} "
                      f"{r['peak_rss_mib']:>13,.0f} {r['peak_anon_mib']:>9,.0f} {r['peak_file_mib']:>10,.0f} {ratio}" + ("  (reused)" if r["cached"] else ""), flush=True)
                if name != "this":
                    base[(size, stage)] = r
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    print("\nspeed x: the baseline's seconds over this commit's; RSS x: this commit's peak over the baseline's. "
          "anon: the process tree's summed anonymous memory at its peak (sampled every 0.25 s); mapped: the largest "
          "process's file-backed resident pages (memory-mapped files the kernel can drop).")


def prepare_replicated(root: Path, code: Path, workdir: Path, overrides: list[str], copies: int,
                       documents: list[list[str]]) -> None:
    """A workdir whose corpus stage output is `copies` copies of a one-copy corpus stage output."""
    if (workdir / REPLICATED).is_file():
        return
    one = root / "text-one"
    write_corpus(one, documents, int(EMBEDDED_TOKENS))
    one_overrides = [o for o in overrides if not o.startswith("corpus.sources")] + \
        [f"corpus.sources=[{{path: '{one}', txt_documents: blank_line}}]"]
    seed_dir = root / "work-one"
    run_measured(code, "tokenizer", seed_dir, one_overrides)
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(seed_dir / "tokenizer", workdir / "tokenizer")
    shutil.copytree(seed_dir / "corpus", workdir / "corpus", ignore=shutil.ignore_patterns("train", "validation"))
    replicate_corpus(seed_dir / "corpus", workdir / "corpus", copies)
    (workdir / REPLICATED).write_text(str(copies))


if __name__ == "__main__":
    main()
