"""Stage bookkeeping: cache keys, manifests, verification and the move into place.

A stage writes one directory `<workdir>/<stage>/` holding its outputs and `manifest.json`. It is built
under `<workdir>/.partial/` and moved into place only when complete, so a crash or a `kill -9` can
never leave a directory that passes for finished. Its cache key is the stage's configuration + the
output fingerprints of its upstream stages + a hash of its code; a finished stage is reused only when
the key matches and every file still matches the manifest: its size, and its mtime and inode recorded
with its sha256 (a file whose mtime or inode differ is hashed, and then only its sha256 decides). The
cheap check reads no file; `lightbert verify` (verify_workdir) re-hashes everything on demand.

Nothing here knows about Prefect or MLflow: flows/ wraps `run_stage` in a task and logs the record.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tasks.artifacts import (
    STAT_KEYS,
    TreeCheck,
    atomic_write_json,
    check_tree,
    hash_tree,
    replace_dir,
    sha256_json,
)
from tasks.section import ConfigError, Section, TrainingConfig

if TYPE_CHECKING:
    from tasks.config import PipelineConfig

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
PARTIAL = ".partial"
T = TypeVar("T")


class StageError(RuntimeError):
    """A stage could not produce its output; the message says why and what to do."""


@dataclass
class StageReport:
    """What a stage's build function returns; it all goes into the manifest."""

    counts: dict[str, float] = field(default_factory=dict)  # logged as metrics
    inputs: list[dict[str, Any]] = field(default_factory=list)  # what went in, with fingerprints
    datasets: list[str] = field(default_factory=list)  # relative paths of Arrow datasets written
    artifacts: list[str] = field(default_factory=list)  # relative paths of small files worth copying
    details: dict[str, Any] = field(default_factory=dict)  # anything else (per-source statistics...)
    # Models to register: {"path": relative dir saved with save_pretrained, "name": registry name}
    models: list[dict[str, str]] = field(default_factory=list)


@dataclass
class StageContext:
    """What a build function may use besides its configuration."""

    name: str
    out_dir: Path  # write every output here (a temporary directory, moved into place at the end)
    scratch_dir: Path  # temporary files that are not outputs (datasets.map cache files...); deleted after
    upstream: dict[str, StageRecord]
    config: PipelineConfig
    resuming: bool = False  # out_dir holds what an interrupted attempt with the same key left
    # The previous output when it has this very cache key but failed verification (a damaged file):
    # a stage made of independent shards may reuse the shards that still match their sha256.
    salvage_dir: Path | None = None
    # Metrics while the stage runs (training curves); the flow points this at MLflow.
    metrics_sink: Callable[[dict[str, float], int | None], None] | None = None
    # How independent shards run: shard_map(fn, jobs, shared) -> [fn(job, shared) for job in jobs], in
    # order. None: the stage's own worker processes; the flow sets it to Prefect tasks on a Dask
    # cluster (run.task_runner: dask).
    shard_map: Callable[[Callable[[Any, Any], Any], list, Any], list] | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.metrics_sink is not None:
            self.metrics_sink(metrics, step)

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def num_proc(self) -> int:
        return self.config.run.resolved_num_proc()

    def upstream_dir(self, name: str) -> Path:
        return self.upstream[name].dir

    def map_shards(self, fn: Callable[[Any, Any], Any], jobs: list, shared: Any, desc: str) -> list:
        """[fn(job, shared) for job in jobs], in order: through shard_map when the flow set one, else in
        run.num_proc local worker processes (tasks/shards.py)."""
        if self.shard_map is not None:
            return self.shard_map(fn, jobs, shared)
        from tasks.shards import run_local

        return run_local(fn, jobs, shared, self.num_proc,
                         lambda it, total: self.progress(it, desc, total=total, unit="shard"))

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=f"{self.name}: {desc}", total=total, unit=unit,
                        disable=not self.config.run.progress, mininterval=1.0, leave=False)


@dataclass(frozen=True)
class StageSpec:
    """Everything the pipeline knows about a stage, declared once in tasks/<stage>/__init__.py; the
    ordered registry is tasks/pipeline.py, and every list of stages, sections and model names is derived
    from it."""

    name: str
    # The build function, or its "module:function" (imported when the stage runs: the registry's stages
    # use this, so reading the registry, for the configuration or the CLI, imports no torch).
    build: str | Callable[[PipelineConfig, StageContext], StageReport]
    upstream: tuple[str, ...] = ()
    # The stage's configuration section (a pydantic model), at the top level under the stage's name; None
    # when another section configures it (the task stages: evaluate.downstream).
    section: type[Section] | None = None
    # The part of the configuration that decides the output; default: the stage's section.
    key_config: Callable[[PipelineConfig], dict[str, Any]] | None = None
    # Checks across sections, run when the configuration is validated (before any stage starts): each
    # raises ValueError naming the keys and the fix.
    checks: tuple[Callable[[PipelineConfig], None], ...] = ()
    # Helper modules whose code also decides the output (the build function's own module always does).
    code_modules: tuple[str, ...] = ()
    # True when the build function can continue from what an interrupted attempt left in out_dir.
    resumable: bool = False
    # The models it saves and registers: {model name: registry name}. A name with {task} is one per task.
    models: dict[str, str] = field(default_factory=dict)
    # A training stage: the keys of its section that hold its TrainingConfig (e.g. ("train",)); it can run
    # on several GPUs under torchrun (`lightbert train STAGE`).
    training: tuple[str, ...] = ()

    @property
    def build_module(self) -> str:
        return self.build.partition(":")[0] if isinstance(self.build, str) else self.build.__module__

    def build_fn(self) -> Callable[[PipelineConfig, StageContext], StageReport]:
        if not isinstance(self.build, str):
            return self.build
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)

    def config_for_key(self, cfg: PipelineConfig) -> dict[str, Any]:
        if self.key_config is not None:
            return self.key_config(cfg)
        return {self.name: cfg.section(self.name)}

    def training_config(self, cfg: PipelineConfig) -> TrainingConfig:
        """The TrainingConfig of a training stage (its first one when it has several)."""
        node: Any = getattr(cfg, self.name)
        return getattr(node, self.training[0])


@dataclass
class StageRecord:
    """A finished stage: where it is, its manifest, and whether this run reused it."""

    name: str
    dir: Path
    manifest: dict[str, Any]
    cached: bool
    reason: str  # why it was recomputed, or "up to date"

    @property
    def fingerprint(self) -> str:
        return self.manifest["output_fingerprint"]


def saved_models(records: Iterable[StageRecord]) -> dict[str, tuple[StageRecord, Path]]:
    """{registry name: (the stage record, the saved model's folder)} of every model these stages saved
    (their manifests' "models" entries): how later stages find the models without knowing their layout."""
    return {entry["name"]: (record, record.dir / entry["path"])
            for record in records for entry in record.manifest.get("models", [])}


# ------------------------------------------------------------------------------------------------
# code version
# ------------------------------------------------------------------------------------------------
@cache
def code_version() -> str:
    """Package version plus the git commit when run from a checkout (informational, not the key)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("lightbert")
    except PackageNotFoundError:
        ver = "0+unknown"
    repo = Path(__file__).resolve().parent.parent
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return f"{ver}+g{out.stdout.strip()}"
    return ver


def code_fingerprint(spec: StageSpec) -> str:
    modules = [spec.build_module, *spec.code_modules]
    sources = {}
    for name in sorted(set(modules)):
        module = sys.modules.get(name) or importlib.import_module(name)
        sources[name] = inspect.getsource(module)
    return sha256_json(sources)


def cache_key_parts(spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, StageRecord]) -> dict[str, Any]:
    return {
        "stage": spec.name,
        "config": spec.config_for_key(cfg),
        "upstream": {name: upstream[name].fingerprint for name in spec.upstream},
        "code": code_fingerprint(spec),
    }


# ------------------------------------------------------------------------------------------------
# reading and checking a finished stage
# ------------------------------------------------------------------------------------------------
def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _diff_config(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff_config(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_files(stage_dir: Path, manifest: dict[str, Any], rehash: bool = False,
                all_problems: bool = False) -> TreeCheck:
    """Check a finished stage's files against its manifest (artifacts.check_tree). By metadata: a file
    whose size, mtime_ns and inode match its manifest entry ("file_stats") is not read; rehash=True
    hashes every file. The metadata counts as recorded when the manifest was written (its mtime: the
    same clock as the files'), so a file written just before that is hashed all the same."""
    try:
        recorded_at: int | None = (stage_dir / MANIFEST).stat().st_mtime_ns
    except OSError:
        recorded_at = None
    return check_tree(stage_dir, manifest.get("files", {}), manifest.get("file_stats"),
                      recorded_at_ns=recorded_at, rehash=rehash, all_problems=all_problems)


def _shown(paths: list[str], limit: int = 3) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _reuse_reason(result: TreeCheck) -> str:
    notes = []
    if result.metadata_changed:
        n = len(result.metadata_changed)
        notes.append(f"{n} file{'s' * (n > 1)} with a new mtime or inode but the same sha256: "
                     f"{_shown(result.metadata_changed)}; hashed on every check until the stage is rebuilt")
    if result.unrecorded:
        notes.append(f"{result.unrecorded} file{'s' * (result.unrecorded > 1)} checked by sha256: "
                     "the manifest predates recorded file metadata")
    return "up to date" + (f" ({'; '.join(notes)})" if notes else "")


def check_stage(stage_dir: Path, parts: dict[str, Any], verify: bool = True) -> tuple[bool, str]:
    """(reusable?, reason). Reusable only if the key matches and the files match the manifest.

    verify=True checks the files by metadata (check_files): size, mtime_ns and inode against the
    manifest, no file read; a file whose mtime or inode differ is hashed, and the stage is not reusable
    only if its sha256 differs too. So a `touch`, or a copy that keeps the content, keeps the stage; the
    reason says so ("up to date (1 file with a new mtime or inode but the same sha256: ...)"). The
    manifest is left as it was built: a check never writes (it runs beside `lightbert verify`, on
    read-only copies, on the main rank of torchrun), and the stage's record stays the one made when it
    was built; the price is that such files are hashed again on each check until the stage is rebuilt.
    Manifests written before the metadata was recorded are checked by sha256, as before.

    The cheap check cannot see a file damaged in place with its size and mtime kept (a disk fault, a
    tool that restores mtimes): `lightbert verify` re-hashes every file and names it.
    """
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return False, "no finished output" if not stage_dir.exists() else "manifest missing or unreadable"
    if manifest.get("schema") != MANIFEST_SCHEMA:
        return False, "manifest written by another lightbert version"
    old = manifest.get("key_parts", {})
    if manifest.get("cache_key") != sha256_json(parts):
        changes = _diff_config(old.get("config"), parts["config"])
        if changes:
            shown = "; ".join(changes[:3]) + (" ..." if len(changes) > 3 else "")
            return False, f"config changed ({shown})"
        if old.get("upstream") != parts["upstream"]:
            changed = [k for k in parts["upstream"] if old.get("upstream", {}).get(k) != parts["upstream"][k]]
            return False, f"upstream changed ({', '.join(changed) or 'stages'})"
        if old.get("code") != parts["code"]:
            return False, "code changed"
        return False, "cache key changed"
    if verify:
        result = check_files(stage_dir, manifest)
        if result.problems:
            return False, f"output no longer matches its manifest: {result.problems[0]}"
        return True, _reuse_reason(result)
    return True, "up to date"


@dataclass
class StageVerification:
    """One finished stage re-hashed by verify_workdir: its problems, one line each (empty: all match)."""

    name: str
    dir: Path
    check: TreeCheck
    note: str = ""  # e.g. the manifest is unreadable, or the stage was replaced while it was checked

    @property
    def ok(self) -> bool:
        return self.check.ok


def finished_stage_dirs(workdir: Path, order: Iterable[str] = ()) -> list[Path]:
    """The stage folders of a workdir that hold a manifest: those named in `order` (the registry's stages,
    tasks.pipeline.STAGES) in that order, then any other (hidden folders such as .partial left out)."""
    workdir, order = Path(workdir), list(order)
    known = [workdir / name for name in order]
    others = sorted(p for p in workdir.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and p.name not in order) if workdir.is_dir() else []
    return [p for p in [*known, *others] if (p / MANIFEST).is_file()]


def verify_workdir(workdir: Path, order: Iterable[str] = ()) -> list[StageVerification]:
    """Re-hash every file of every finished stage of a workdir against its manifest (`lightbert verify`):
    every problem, not only the first. It writes nothing and takes no lock, so it may run beside a
    `lightbert run`; a stage that run replaces while it is checked is said so, not reported as damaged."""
    out = []
    for stage_dir in finished_stage_dirs(workdir, order):
        manifest = read_manifest(stage_dir)
        if manifest is None or not isinstance(manifest.get("files"), dict):
            out.append(StageVerification(stage_dir.name, stage_dir,
                                         TreeCheck(problems=[f"{MANIFEST} is unreadable"])))
            continue
        result = check_files(stage_dir, manifest, rehash=True, all_problems=True)
        note = ""
        if result.problems:
            now = read_manifest(stage_dir) or {}
            if (now.get("cache_key"), now.get("output_fingerprint")) != (
                    manifest.get("cache_key"), manifest.get("output_fingerprint")):
                note = "rebuilt while it was checked (a run is using this workdir): verify again after it"
                result = TreeCheck(files=result.files, bytes=result.bytes, hashed_files=result.hashed_files,
                                   hashed_bytes=result.hashed_bytes, seconds=result.seconds)
        out.append(StageVerification(stage_dir.name, stage_dir, result, note))
    return out


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_stage(
    spec: StageSpec,
    cfg: PipelineConfig,
    workdir: Path,
    upstream: dict[str, StageRecord],
    producer: dict[str, Any] | None = None,
    force: bool = False,
    metrics_sink: Callable[[dict[str, float], int | None], None] | None = None,
    shard_map: Callable[[Callable[[Any, Any], Any], list, Any], list] | None = None,
) -> StageRecord:
    """Reuse the stage's finished output when it is valid for this key, else build it afresh.

    `producer` (e.g. {"mlflow_run_id": ...}) is stored in a new manifest so a later reuse can name
    the run that made the output.
    """
    missing = [u for u in spec.upstream if u not in upstream]
    if missing:
        raise StageError(f"stage {spec.name} needs {', '.join(missing)} first")
    workdir = Path(workdir)
    final = workdir / spec.name
    parts = cache_key_parts(spec, cfg, upstream)
    key = sha256_json(parts)

    reusable, reason = (False, "forced") if force else check_stage(final, parts)
    if reusable:
        return StageRecord(spec.name, final, read_manifest(final) or {}, cached=True, reason=reason)

    partial_root = workdir / PARTIAL
    out_dir = partial_root / f"{spec.name}-{key[:16]}"
    scratch = partial_root / f"{spec.name}-{key[:16]}.scratch"
    resuming = spec.resumable and out_dir.is_dir() and any(out_dir.iterdir())
    # Leftovers of this stage under another key can never be finished: drop them.
    if partial_root.is_dir():
        for old in partial_root.glob(f"{spec.name}-*"):
            if old not in (out_dir, scratch) or (old == out_dir and not resuming):
                shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)

    previous = read_manifest(final)
    salvage = final if not force and previous is not None and previous.get("cache_key") == key else None
    ctx = StageContext(spec.name, out_dir, scratch, upstream, cfg, resuming=resuming, salvage_dir=salvage,
                       metrics_sink=metrics_sink, shard_map=shard_map)
    started_at, t0 = _now(), time.perf_counter()
    try:
        report = spec.build_fn()(cfg, ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - t0

    # The sha256 of every file, and the metadata (mtime_ns, inode) that lets a later check reuse the stage
    # without reading it. "files" and the output fingerprint hold only {size, sha256}, exactly as before
    # (they are compared across runs and machines); the metadata, which differs on every build, is kept
    # apart under "file_stats".
    hashed = hash_tree(out_dir, exclude=(MANIFEST,), with_stat=True)
    files = {rel: {"size": entry["size"], "sha256": entry["sha256"]} for rel, entry in hashed.items()}
    file_stats = {rel: {key: entry[key] for key in STAT_KEYS} for rel, entry in hashed.items()}
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "stage": spec.name,
        "cache_key": key,
        "key_parts": parts,
        "config": parts["config"],
        "upstream": {name: {"fingerprint": upstream[name].fingerprint, "dir": str(upstream[name].dir)}
                     for name in spec.upstream},
        "code_version": code_version(),
        "inputs": report.inputs,
        "counts": report.counts,
        "timings": {"started": started_at, "finished": _now(), "seconds": round(seconds, 3)},
        "files": files,
        "file_stats": file_stats,
        "output_fingerprint": sha256_json(files),
        "datasets": report.datasets,
        "artifacts": report.artifacts,
        "details": report.details,
        "models": report.models,
        "produced_by": producer or {},
        "resumed": resuming,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    replace_dir(out_dir, final)
    with contextlib.suppress(OSError):
        partial_root.rmdir()  # only when empty
    return StageRecord(spec.name, final, manifest, cached=False, reason=reason)


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """One pipeline run per workdir at a time; a second one gets a clear error, not a corrupt dir. The
    lock is filelock's (an OS lock on <workdir>/.lock, released when the process dies, even by kill -9);
    the holder's pid is written beside it for the message."""
    from filelock import FileLock, Timeout

    workdir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(workdir / ".lock", timeout=0)
    holder = workdir / ".lock.pid"
    try:
        lock.acquire()
    except Timeout:
        pid = holder.read_text(encoding="utf-8").strip() if holder.is_file() else "?"
        raise ConfigError(
            f"another lightbert run (pid {pid or '?'}) is using {workdir}; wait for it to finish "
            "or pass another --workdir"
        ) from None
    try:
        holder.write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        lock.release()
