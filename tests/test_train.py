"""lightbert train: a training stage under torchrun (2 CPU processes, gloo), finished with the cache key
`lightbert run` computes, so the pipeline reuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.pipeline import SPECS
from tasks.stage import read_manifest, run_stage

ROOT = Path(__file__).resolve().parents[1]
SETS = ["run.progress=false", "albert.train.max_steps=4", "albert.train.batch_size=8",
        "albert.train.effective_batch_size=16", "albert.train.warmup_steps=1", "albert.train.checkpoint_every=2",
        "albert.train.log_every=2"]


@pytest.mark.slow
def test_torchrun_trains_albert_on_two_processes_and_the_pipeline_reuses_it(smoke_stages):
    wd = smoke_stages["workdir"]
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "flows.cli", "train", "albert",
           "--workdir", str(wd), "--preset", "smoke", *(a for s in SETS for a in ("--set", s))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "it/s]" not in line)[-3000:]
    counts = read_manifest(wd / "albert")["counts"]
    # 4 steps of 16 examples: 8 per process per step
    assert counts["scratch_steps"] == counts["distilled_steps"] == 4
    assert not list((wd / ".partial").glob("albert-*"))  # moved into place, nothing left behind

    cfg, _ = load_config("smoke", overrides=SETS)
    upstream = {n: smoke_stages["records"][n] for n in SPECS["albert"].upstream}
    assert run_stage(SPECS["albert"], cfg, wd, upstream).cached  # same key as `lightbert run`

    again = subprocess.run(cmd[:3] + ["1"] + cmd[4:], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "is up to date" in again.stdout


def test_launch_names_the_missing_upstream_stage(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train", "distilbert", "--workdir", str(tmp_path),
                           "--preset", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "is not a finished stage" in done.stderr and "lightbert run --until teacher" in done.stderr


def test_train_refuses_a_stage_that_does_not_train(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["train", "corpus", "--workdir", str(tmp_path), "--preset", "smoke"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'corpus' is not a training stage" in result.output and "teacher, distilbert, albert" in result.output
