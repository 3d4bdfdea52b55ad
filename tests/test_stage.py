"""Stage bookkeeping without Prefect: reuse, recompute on change or damage, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tasks.stage import MANIFEST, StageReport, StageSpec, check_stage, read_manifest, run_stage, workdir_lock

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

