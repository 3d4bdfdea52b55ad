"""`lightbert verify`: re-hash every finished stage and name what changed (exit 1), or say all match (0)."""

from __future__ import annotations

import os
import time

from typer.testing import CliRunner

from flows.cli import app
from tasks.stage import StageReport, StageSpec, run_stage

runner = CliRunner()
SIZE = 1 << 20


def _build_blobs(cfg, ctx):
    old = time.time_ns() - 10_000_000_000  # written a while before the manifest
    (ctx.out_dir / "shards").mkdir()
    for i in range(3):
        path = ctx.out_dir / "shards" / f"{i}.bin"
        path.write_bytes(os.urandom(SIZE))
        os.utime(path, ns=(old, old))
    return StageReport(counts={"shards": 3})


def _build_index(cfg, ctx):
    (ctx.out_dir / "index.txt").write_text(",".join(sorted(os.listdir(ctx.upstream_dir("blobs") / "shards"))))
    return StageReport()


BLOBS = StageSpec("blobs", _build_blobs, key_config=lambda cfg: {"shards": 3})
INDEX = StageSpec("index", _build_index, upstream=("blobs",), key_config=lambda cfg: {})


def _finished(make_config, workdir):
    cfg = make_config()
    blobs = run_stage(BLOBS, cfg, workdir, {})
    run_stage(INDEX, cfg, workdir, {"blobs": blobs})
    return cfg


def _verify(workdir):
    return runner.invoke(app, ["verify", "--workdir", str(workdir)])


def test_verify_clean_workdir_exits_0_with_what_it_checked(make_config, workdir):
    _finished(make_config, workdir)
    result = _verify(workdir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("blobs") and " ok " in line and "3 files, 3.15 MB" in line for line in lines)
    assert any(line.startswith("index") and " ok " in line for line in lines)
    assert "checked 4 files, 3.15 MB in " in lines[-1] and "every file matches its manifest" in lines[-1]


def test_verify_names_every_changed_file_stage_by_stage_and_exits_1(make_config, workdir):
    _finished(make_config, workdir)
    shard = workdir / "blobs" / "shards" / "0.bin"
    before = shard.stat()
    with open(shard, "r+b") as f:  # damaged in place, size and mtime kept: only a re-hash can see it
        f.write(b"\0" * 16)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    (workdir / "blobs" / "shards" / "2.bin").unlink()
    (workdir / "index" / "index.txt").write_text("longer than before, so another size")

    result = _verify(workdir)
    assert result.exit_code == 1, result.output
    out = result.output
    assert "blobs         CHANGED: 2 of 3 files" in out
    assert "  blobs/shards/0.bin does not match its sha256 in the manifest" in out
    assert "  blobs/shards/2.bin is missing" in out
    assert "index         CHANGED: 1 of 1 files" in out
    assert "  index/index.txt changed size (35 bytes, manifest says 17)" in out
    assert out.index("blobs/shards/0.bin") < out.index("index/index.txt")  # stage by stage, in order
    assert "3 changed in blobs, index" in out.splitlines()[-1]


def test_verify_missing_or_empty_workdir_says_how_to_fix(tmp_path):
    missing = _verify(tmp_path / "nowhere")
    assert missing.exit_code == 2 and isinstance(missing.exception, SystemExit)  # typer.Exit, no traceback
    assert "does not exist" in missing.output and "lightbert run --workdir" in missing.output
    assert "Traceback" not in missing.output
    (tmp_path / "empty").mkdir()
    empty = _verify(tmp_path / "empty")
    assert empty.exit_code == 2 and isinstance(empty.exception, SystemExit)
    assert "holds no finished stage" in empty.output and "lightbert run --workdir" in empty.output
