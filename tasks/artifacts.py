"""File helpers every stage shares: hashing, and writing so that nothing half-written is ever seen."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-ready object (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_tree(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} for every regular file under root."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def verify_tree(root: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """None when every listed file is present with its size and sha256, else what differs."""
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} changed size ({path.stat().st_size} bytes, manifest says {meta['size']})"
    for rel, meta in files.items():
        if sha256_file(root / rel) != meta["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


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
