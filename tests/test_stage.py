"""Stage bookkeeping without Prefect: reuse, recompute on change or damage, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tasks.artifacts import atomic_write_json, sha256_json
from tasks.stage import (
    MANIFEST,
    StageReport,
    StageSpec,
    check_files,
    check_stage,
    read_manifest,
    run_stage,
    workdir_lock,
)

CALLS: list[str] = []


def _build_numbers(cfg, ctx):
    CALLS.append("numbers")
    n = cfg.pairs.dupe_factor
    (ctx.out_dir / "data").mkdir()
    (ctx.out_dir / "data" / "numbers.txt").write_text("\n".join(map(str, range(n))))
    return StageReport(counts={"numbers": n}, datasets=["data"])


def _build_squares(cfg, ctx):
    CALLS.append("squares")
    numbers = (ctx.upstream_dir("numbers") / "data" / "numbers.txt").read_text().split()
    (ctx.out_dir / "squares.txt").write_text("\n".join(str(int(x) ** 2) for x in numbers))
    return StageReport(counts={"squares": len(numbers)})


def _build_failing(cfg, ctx):
    (ctx.out_dir / "half.txt").write_text("half of an output")
    raise RuntimeError("boom")


NUMBERS = StageSpec("numbers", _build_numbers, key_config=lambda cfg: {"n": cfg.pairs.dupe_factor})
SQUARES = StageSpec("squares", _build_squares, upstream=("numbers",),
                    key_config=lambda cfg: {"len": cfg.pairs.max_seq_len})


def _chain(cfg, workdir):
    a = run_stage(NUMBERS, cfg, workdir, {})
    b = run_stage(SQUARES, cfg, workdir, {"numbers": a})
    return a, b


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def test_manifest_records_config_upstream_counts_timings_and_files(make_config, workdir):
    cfg = make_config("pairs.dupe_factor=4")
    a, b = _chain(cfg, workdir)
    m = read_manifest(workdir / "squares")
    assert m["config"] == {"len": cfg.pairs.max_seq_len}
    assert m["upstream"]["numbers"]["fingerprint"] == a.fingerprint
    assert m["counts"] == {"squares": 4}
    assert m["timings"]["seconds"] >= 0 and m["code_version"]
    assert set(m["files"]) == {"squares.txt"} and m["output_fingerprint"] == b.fingerprint
    assert not (workdir / ".partial").exists()


def test_second_run_reuses_everything(make_config, workdir):
    cfg = make_config()
    _chain(cfg, workdir)
    before = (workdir / "squares" / "squares.txt").stat().st_mtime_ns
    CALLS.clear()
    a, b = _chain(cfg, workdir)
    assert CALLS == [] and a.cached and b.cached
    assert (workdir / "squares" / "squares.txt").stat().st_mtime_ns == before


def test_config_change_recomputes_that_stage_and_downstream_only(make_config, workdir):
    _chain(make_config("pairs.dupe_factor=3"), workdir)
    CALLS.clear()
    a, b = _chain(make_config("pairs.dupe_factor=5"), workdir)
    assert CALLS == ["numbers", "squares"]
    assert "config changed (n: 3 -> 5)" in a.reason and b.reason.startswith("upstream changed (numbers)")
    CALLS.clear()
    _, b = _chain(make_config("pairs.dupe_factor=5", "pairs.max_seq_len=32"), workdir)
    assert CALLS == ["squares"]  # nothing upstream


def test_corrupted_or_deleted_output_is_recomputed_never_trusted(make_config, workdir):
    cfg = make_config("pairs.dupe_factor=5")
    _chain(cfg, workdir)
    good = (workdir / "numbers" / "data" / "numbers.txt").read_bytes()
    # same size, different bytes: only the sha256 can tell
    (workdir / "numbers" / "data" / "numbers.txt").write_bytes(good[::-1])
    CALLS.clear()
    a, _ = _chain(cfg, workdir)
    assert "does not match its sha256" in a.reason and CALLS == ["numbers"]
    assert (workdir / "numbers" / "data" / "numbers.txt").read_bytes() == good

    CALLS.clear()
    (workdir / "squares" / "squares.txt").unlink()
    _, b = _chain(cfg, workdir)
    assert "squares.txt is missing" in b.reason and CALLS == ["squares"]

    CALLS.clear()
    import shutil

    shutil.rmtree(workdir / "numbers")
    _chain(cfg, workdir)
    assert CALLS == ["numbers"]  # rebuilt byte-identical, so squares is still valid


def test_failed_stage_leaves_nothing_behind_and_keeps_the_previous_output(make_config, workdir):
    cfg = make_config()
    failing = StageSpec("numbers", _build_failing, key_config=lambda c: {"other": 1})
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(failing, cfg, workdir, {})
    assert not (workdir / "numbers").exists()
    run_stage(NUMBERS, cfg, workdir, {})
    with pytest.raises(RuntimeError):
        run_stage(failing, cfg, workdir, {})
    ok, _ = check_stage(workdir / "numbers", {"stage": "numbers", "config": {"n": cfg.pairs.dupe_factor},
                                               "upstream": {}, "code": read_manifest(workdir / "numbers")
                                               ["key_parts"]["code"]})
    assert ok and not (workdir / "numbers" / "half.txt").exists()


def test_killed_build_never_passes_for_finished(make_config, workdir, tmp_path):
    """A process killed with SIGKILL in the middle of a build leaves only .partial/, which is redone."""
    script = tmp_path / "killme.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from tasks.config import load_config
        from tasks.stage import StageReport, StageSpec, run_stage
        def build(cfg, ctx):
            (ctx.out_dir / "part.txt").write_text("written before the kill")
            os.kill(os.getpid(), signal.SIGKILL)
        cfg, _ = load_config("smoke")
        run_stage(StageSpec("numbers", build, key_config=lambda c: {{"n": c.pairs.dupe_factor}}),
                  cfg, {str(workdir)!r}, {{}})
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True)
    assert proc.returncode == -9
    assert not (workdir / "numbers").exists() and list((workdir / ".partial").iterdir())
    a = run_stage(NUMBERS, make_config(), workdir, {})
    assert not a.cached and (workdir / "numbers" / "data" / "numbers.txt").is_file()
    assert not list((workdir / ".partial").glob("numbers-*")) if (workdir / ".partial").exists() else True
    assert json.loads((workdir / "numbers" / MANIFEST).read_text())["counts"]["numbers"] > 0


def test_one_run_per_workdir(workdir):
    with workdir_lock(workdir):
        code = ("import sys; sys.path.insert(0, '.');"
                "from tasks.stage import workdir_lock\n"
                f"with workdir_lock(__import__('pathlib').Path({str(workdir)!r})): pass")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "another lightbert run" in proc.stderr
    with workdir_lock(workdir):  # released
        pass



# ------------------------------------------------------------------------------------------------
# reuse by metadata (size, mtime_ns, inode) instead of re-hashing
# ------------------------------------------------------------------------------------------------
BIG = 4 << 20  # a "large" output: 4 MiB


def _build_big(cfg, ctx):
    """One large file and one small one, written a while before the manifest (their mtimes set 10 s back,
    as a stage that runs longer than a clock tick after its last write leaves them)."""
    CALLS.append("big")
    old = time.time_ns() - 10_000_000_000
    for name, data in (("weights.bin", os.urandom(BIG)), ("meta.txt", b"small and unchanged")):
        (ctx.out_dir / name).write_bytes(data)
        os.utime(ctx.out_dir / name, ns=(old, old))
    return StageReport(counts={"bytes": BIG})


BIGSPEC = StageSpec("big", _build_big, key_config=lambda cfg: {"size": BIG})


def _damage_in_place(path, keep_mtime=True):
    """Same-size garbage written into the same inode; with keep_mtime, its mtime put back as it was."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(bytes(b ^ 0xFF for b in f.read(4096)))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)


def test_manifest_records_mtime_and_inode_apart_and_the_fingerprint_is_unchanged(make_config, workdir, tmp_path):
    cfg = make_config()
    a = run_stage(BIGSPEC, cfg, workdir, {})
    m = read_manifest(workdir / "big")
    assert all(set(entry) == {"size", "sha256"} for entry in m["files"].values())
    assert m["output_fingerprint"] == sha256_json(m["files"]) == a.fingerprint  # from {size, sha256} only
    for rel, entry in m["file_stats"].items():
        st = (workdir / "big" / rel).stat()  # taken in .partial, still true after the move into place
        assert entry == {"mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    assert set(m["file_stats"]) == set(m["files"]) == {"weights.bin", "meta.txt"}
    # the same output built elsewhere: same files and fingerprint, other metadata
    b = run_stage(NUMBERS, cfg, tmp_path / "w1", {})
    c = run_stage(NUMBERS, cfg, tmp_path / "w2", {})
    assert b.manifest["files"] == c.manifest["files"] and b.fingerprint == c.fingerprint
    assert b.manifest["file_stats"] != c.manifest["file_stats"]  # other inodes


def test_reuse_reads_no_file_so_in_place_damage_keeping_mtime_is_reused(make_config, workdir):
    cfg = make_config()
    run_stage(BIGSPEC, cfg, workdir, {})
    manifest_bytes = (workdir / "big" / MANIFEST).read_bytes()
    _damage_in_place(workdir / "big" / "weights.bin")
    CALLS.clear()
    again = run_stage(BIGSPEC, cfg, workdir, {})
    # reused: the only way it could have seen the damage is by reading the file
    assert again.cached and again.reason == "up to date" and CALLS == []
    assert (workdir / "big" / MANIFEST).read_bytes() == manifest_bytes
    # what `lightbert verify` does: hash everything
    full = check_files(workdir / "big", read_manifest(workdir / "big"), rehash=True, all_problems=True)
    assert full.problems == ["weights.bin does not match its sha256 in the manifest"]
    assert full.hashed_files == 2 and full.hashed_bytes == BIG + len(b"small and unchanged")


def test_changed_content_rebuilds_by_size_or_by_new_mtime(make_config, workdir):
    cfg = make_config()
    run_stage(BIGSPEC, cfg, workdir, {})
    good = (workdir / "big" / "weights.bin").read_bytes()
    (workdir / "big" / "weights.bin").write_bytes(good + b"x")  # other size
    CALLS.clear()
    a = run_stage(BIGSPEC, cfg, workdir, {})
    assert not a.cached and CALLS == ["big"] and "weights.bin changed size" in a.reason

    CALLS.clear()
    _damage_in_place(workdir / "big" / "weights.bin", keep_mtime=False)  # same size, new mtime
    b = run_stage(BIGSPEC, cfg, workdir, {})
    assert not b.cached and CALLS == ["big"]
    assert b.reason.endswith("weights.bin does not match its sha256 in the manifest")


def test_touch_alone_still_reuses_and_says_so(make_config, workdir):
    cfg = make_config()
    run_stage(BIGSPEC, cfg, workdir, {})
    manifest_bytes = (workdir / "big" / MANIFEST).read_bytes()
    os.utime(workdir / "big" / "weights.bin")  # touch: new mtime, same content
    CALLS.clear()
    a = run_stage(BIGSPEC, cfg, workdir, {})
    assert a.cached and CALLS == []
    assert "1 file with a new mtime or inode but the same sha256: weights.bin" in a.reason
    # the manifest is left as built (documented in check_stage): the file is hashed on each check
    assert (workdir / "big" / MANIFEST).read_bytes() == manifest_bytes
    result = check_files(workdir / "big", read_manifest(workdir / "big"))
    assert result.ok and result.hashed_files == 1 and result.metadata_changed == ["weights.bin"]

    # a copy that keeps the content (and even the mtime, as cp -a does) gets new inodes: also reused
    shutil.copytree(workdir / "big", workdir / "big.copy", copy_function=shutil.copy2)
    shutil.rmtree(workdir / "big")
    os.rename(workdir / "big.copy", workdir / "big")
    b = run_stage(BIGSPEC, cfg, workdir, {})
    assert b.cached and CALLS == [] and "2 files with a new mtime or inode but the same sha256" in b.reason


def test_old_manifest_without_metadata_is_checked_by_hashing(make_config, workdir):
    cfg = make_config()
    run_stage(BIGSPEC, cfg, workdir, {})
    m = read_manifest(workdir / "big")
    del m["file_stats"]  # as written before mtime_ns/inode were recorded
    atomic_write_json(workdir / "big" / MANIFEST, m)
    CALLS.clear()
    a = run_stage(BIGSPEC, cfg, workdir, {})
    assert a.cached and CALLS == [] and "2 files checked by sha256" in a.reason
    assert check_files(workdir / "big", m).hashed_files == 2
    # hashed, so damage that keeps size and mtime is found, and the stage rebuilt
    _damage_in_place(workdir / "big" / "weights.bin")
    b = run_stage(BIGSPEC, cfg, workdir, {})
    assert not b.cached and CALLS == ["big"] and "weights.bin does not match its sha256" in b.reason
    assert "file_stats" in b.manifest


def test_a_file_written_just_before_its_manifest_is_hashed_all_the_same(make_config, workdir):
    """Timestamps tick every few ms (or second): a rewrite in the tick the metadata was recorded in
    keeps the mtime, so a file that recent is not vouched for by its metadata."""
    cfg = make_config()
    run_stage(BIGSPEC, cfg, workdir, {})
    manifest = workdir / "big" / MANIFEST
    recorded = read_manifest(workdir / "big")["file_stats"]["weights.bin"]["mtime_ns"]
    _damage_in_place(workdir / "big" / "weights.bin")
    os.utime(manifest, ns=(recorded, recorded + 50_000_000))  # manifest written 50 ms after the file
    ok, reason = check_stage(workdir / "big", read_manifest(workdir / "big")["key_parts"])
    assert not ok and "weights.bin does not match its sha256" in reason
    os.utime(manifest, ns=(recorded, recorded + 5_000_000_000))  # 5 s after: the metadata vouches for it
    ok, reason = check_stage(workdir / "big", read_manifest(workdir / "big")["key_parts"])
    assert ok and reason == "up to date"
