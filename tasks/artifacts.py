"""File helpers every stage shares: hashing, and writing so that nothing half-written is ever seen."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def _sha256_fileobj(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_fileobj(f)


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-ready object (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# What a manifest records of a file beside its size and sha256, so that a later check can tell the file
# is untouched without reading it: its modification time and its inode (a copy, even `cp -a`, gets a new
# inode; an in-place rewrite gets a new mtime). The device number is left out on purpose: it is not
# stable for the same files (overlay and NFS mounts, containers started afresh get new ones), and the
# inode plus mtime plus size already change when a file is replaced.
STAT_KEYS = ("mtime_ns", "inode")


def file_stat(st: os.stat_result) -> dict[str, int]:
    return {"mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def sha256_file_with_stat(path: Path) -> tuple[str, os.stat_result]:
    """(sha256, the file's stat taken on the open file just before it was read). Hashed again (a few
    times at most) when the file changed while it was read, so the stat belongs to the bytes hashed; if
    it never settles, the stat taken first is returned, and a later check finds it stale and re-hashes."""
    first = None
    for _ in range(3):
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            digest = _sha256_fileobj(f)
            after = os.fstat(f.fileno())
        first = first or (digest, before)
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            return digest, before
    return first


def hash_tree(root: Path, exclude: tuple[str, ...] = (), with_stat: bool = False) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} for every regular file under root; with_stat adds the
    STAT_KEYS (mtime_ns, inode), taken with the sha256 (see sha256_file_with_stat)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        digest, st = sha256_file_with_stat(path)
        files[rel] = {"size": st.st_size, "sha256": digest, **(file_stat(st) if with_stat else {})}
    return files


def _racy_margin_ns(mtime_ns: int) -> int:
    """How close to the time its metadata was recorded a file's mtime may be before a later rewrite of
    it could keep the same mtime (timestamps are taken from a clock that ticks every few ms, or every
    second, or two, on filesystems that store whole seconds: those show as mtimes in whole seconds)."""
    return 2_000_000_000 if mtime_ns % 1_000_000_000 == 0 else 100_000_000


@dataclass
class TreeCheck:
    """What check_tree found: `problems` (one line per file that changed: missing, size, sha256) and
    what it cost (files and bytes looked at, files and bytes read to hash them)."""

    problems: list[str] = field(default_factory=list)
    # Files whose mtime or inode differ from the manifest's but whose sha256 still matches (a `touch`,
    # a copy): the output is intact.
    metadata_changed: list[str] = field(default_factory=list)
    unrecorded: int = 0  # files the manifest has no metadata for (written before it was recorded)
    files: int = 0
    bytes: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tree(
    root: Path,
    files: dict[str, dict[str, Any]],
    stats: dict[str, dict[str, Any]] | None = None,
    *,
    recorded_at_ns: int | None = None,
    rehash: bool = False,
    all_problems: bool = False,
) -> TreeCheck:
    """Check that every file of a manifest (`files`: {path: {size, sha256}}) is under root unchanged.

    Missing files and sizes are checked first, for every file. Then a file is hashed only when its
    metadata does not vouch for it: no entry in `stats` ({path: {mtime_ns, inode}}, e.g. a manifest
    written before they were recorded), an mtime or inode that differs from its entry (then the sha256
    decides: same sha256 -> `metadata_changed`, not a problem), or an mtime so close to
    `recorded_at_ns` (when the metadata was recorded, on the files' clock; None: unknown) that a rewrite
    in the same clock tick would not have changed it. rehash=True hashes every file (`lightbert verify`).

    The cheap check trusts size + mtime + inode: a file damaged in place without any of them changing
    (a disk or memory fault, a tool that writes and then restores the mtime) passes it. `lightbert
    verify` (rehash=True) re-hashes everything and finds it.

    Stops at the first problem unless all_problems.
    """
    t0 = time.perf_counter()
    out = TreeCheck()
    stats = stats or {}
    to_hash: list[tuple[str, int, bool]] = []  # (path, size, metadata differs from its entry)
    for rel, meta in files.items():
        try:
            st = os.stat(root / rel)
        except OSError:
            st = None
        out.files += 1
        if st is None or not stat.S_ISREG(st.st_mode):
            out.problems.append(f"{rel} is missing")
        elif st.st_size != meta["size"]:
            out.problems.append(f"{rel} changed size ({st.st_size} bytes, manifest says {meta['size']})")
        else:
            out.bytes += st.st_size
            entry = stats.get(rel)
            if entry is None or any(k not in entry for k in STAT_KEYS):
                out.unrecorded += 1
                to_hash.append((rel, st.st_size, False))
            elif file_stat(st) != {k: entry[k] for k in STAT_KEYS}:
                to_hash.append((rel, st.st_size, True))
            elif (rehash or recorded_at_ns is None
                  or entry["mtime_ns"] >= recorded_at_ns - _racy_margin_ns(entry["mtime_ns"])):
                to_hash.append((rel, st.st_size, False))
        if out.problems and not all_problems:
            out.seconds = time.perf_counter() - t0
            return out
    for rel, size, differs in to_hash:
        try:
            digest = sha256_file(root / rel)
        except OSError:
            digest = None
        out.hashed_files += 1
        out.hashed_bytes += size
        if digest is None:
            out.problems.append(f"{rel} is missing")
        elif digest != files[rel]["sha256"]:
            out.problems.append(f"{rel} does not match its sha256 in the manifest")
        elif differs:
            out.metadata_changed.append(rel)
        if out.problems and not all_problems:
            break
    out.seconds = time.perf_counter() - t0
    return out


def verify_tree(root: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """None when every listed file is present with its size and sha256 (every file hashed), else what
    differs (the first problem)."""
    result = check_tree(root, files, rehash=True)
    return result.problems[0] if result.problems else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_output_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; it is moved onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory onto dst. dst is either the old complete output or absent, never half."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if dst.exists():
        trash = src.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def read_json_or_empty(path: Path) -> dict:
    """A JSON file's content, or {} when it is missing or unreadable (a record being rebuilt)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def matches_record(path: Path, record: dict | None) -> bool:
    """True when the file exists with the size and sha256 of its record ({"sha256", "size"})."""
    return (record is not None and path.is_file() and path.stat().st_size == record.get("size")
            and sha256_file(path) == record.get("sha256"))
