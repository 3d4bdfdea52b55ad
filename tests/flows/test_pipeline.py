"""The real chain under Prefect and MLflow: tracked runs, reuse, resume after kill -9, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import check_report, tiny_overrides

from flows.stages import STAGES  # every stage that exists so far, in order
from tasks.config import load_config
from tasks.stage import read_manifest


def _runs(workdir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lightbert")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("lightbert.kind") == "pipeline"]
    children = {p.info.run_id: {r.info.run_name: r for r in runs
                                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
                for p in parents}
    return client, parents, children


@pytest.mark.slow
def test_flow_tracks_each_stage_and_reuses_them(prefect_harness, text_corpus, workdir):
    from flows.pipeline import lightbert_pipeline

    cfg, _ = load_config("smoke", overrides=tiny_overrides(text_corpus))
    out = lightbert_pipeline(cfg.model_dump(mode="json"), str(workdir), preset="smoke")
    assert tuple(out) == STAGES
    assert (workdir / "config.yaml").is_file()
    stamps = {s: read_manifest(workdir / s)["output_fingerprint"] for s in STAGES}

    client, parents, children = _runs(workdir)
    assert len(parents) == 1 and set(children[parents[0].info.run_id]) == set(STAGES)
    assert parents[0].data.params["pairs.max_seq_len"] == "32"
    first = children[parents[0].info.run_id]
    for stage, run in first.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["lightbert.cached"] == "false"
        assert run.data.tags["lightbert.output_fingerprint"] == stamps[stage]
        assert run.data.metrics["stage_seconds"] >= 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "manifest.json" in artifacts
    # every model a stage saved is in the registry, once, tagged with the output it came from
    registered = {m["name"]: stage for stage in STAGES for m in read_manifest(workdir / stage)["models"]}
    assert {"lightbert-teacher", "lightbert-distilbert", "lightbert-albert-scratch",
            "lightbert-albert-distilled"} <= set(registered)
    for name, stage in registered.items():
        versions = client.search_model_versions(f"name='{name}'")
        assert len(versions) == 1 and versions[0].run_id == first[stage].info.run_id
        assert versions[0].tags["lightbert.output_fingerprint"] == stamps[stage]
    assert first["teacher"].data.tags["lightbert.provenance.kind"] == "trained here"  # where the teacher came from
    assert first["teacher"].data.tags["lightbert.teacher.mlm_head"] == "pretrained"
    outputs = [a.path for a in client.list_artifacts(first["tokenizer"].info.run_id, "outputs")]
    assert any(p.endswith("tokenizer.json") for p in outputs)
    # lineage: pairs consumed corpus and tokenizer outputs, and produced its own datasets
    contexts = {(d.dataset.name, d.tags[0].value) for d in first["pairs"].inputs.dataset_inputs}
    assert ("corpus/train", "input") in contexts and ("pairs/train", "output") in contexts
    assert first["pairs"].data.metrics["examples_train"] > 0
    # the comparison report, its plots in MLflow, and every model's scores on its registry version
    report = json.loads((workdir / "evaluate" / "report.json").read_text())
    models = ["teacher", "distilbert", "albert-scratch", "albert-distilled"]
    check_report(report, models, cfg.evaluate.downstream.seeds)
    table = (workdir / "evaluate" / "report.md").read_text()
    assert all(f"| {m} |" in table for m in models)
    for plot in ("accuracy_vs_parameters.png", "accuracy_vs_cpu_latency.png"):
        assert (workdir / "evaluate" / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(first["evaluate"].info.run_id, "outputs/plots")}
    assert logged == {"outputs/plots/accuracy_vs_parameters.png", "outputs/plots/accuracy_vs_cpu_latency.png"}
    assert {a.path for a in client.list_artifacts(first["evaluate"].info.run_id, "outputs")} >= {
        "outputs/report.json", "outputs/report.md"}
    for entry in report["models"]:  # the first evaluated version of each model becomes its champion
        champion = client.get_model_version_by_alias(entry["registered_name"], "champion")
        assert str(champion.version) == "1"
        assert champion.tags["lightbert.protocol"] == report["protocol"]["fingerprint"]
        if entry["downstream_validation"] is not None:
            assert float(champion.tags["metric.downstream_validation"]) == entry["downstream_validation"]
        assert float(champion.tags["metric.cpu_latency_ms"]) == entry["cpu_latency_ms"]
    # the task models: the fine-tuned teacher and each task-distilled student, as text classifiers
    for name in ("lightbert-teacher-movie-sentences", "lightbert-distilbert-movie-sentences"):
        version = client.get_model_version_by_alias(name, "champion")
        assert version.tags["lightbert.protocol"] == report["protocol"]["fingerprint"]
        assert "metric.test_accuracy" in version.tags and "metric.validation_accuracy" in version.tags

    # Second run: nothing rebuilt, each stage run names the run that produced its output.
    mtimes = {s: (workdir / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    lightbert_pipeline(cfg.model_dump(mode="json"), str(workdir), preset="smoke")
    _, parents, children = _runs(workdir)
    second = children[parents[1].info.run_id]
    for stage in STAGES:
        assert second[stage].data.tags["lightbert.cached"] == "true"
        assert second[stage].data.tags["lightbert.produced_by_run"] == first[stage].info.run_id
        assert (workdir / stage / "manifest.json").stat().st_mtime_ns == mtimes[stage]
    for name in registered:  # a reused stage registers nothing new
        assert len(client.search_model_versions(f"name='{name}'")) == 1

    # A pairs setting changes: only pairs is rebuilt.
    cfg2, _ = load_config("smoke", overrides=tiny_overrides(text_corpus, "pairs.dupe_factor=3"))
    lightbert_pipeline(cfg2.model_dump(mode="json"), str(workdir), preset="smoke")
    _, parents, children = _runs(workdir)
    third = children[parents[2].info.run_id]
    assert [third[s].data.tags["lightbert.cached"] for s in STAGES[:3]] == ["true", "true", "false"]
    assert all(third[s].data.tags["lightbert.cached"] == "false" for s in STAGES[3:])  # downstream of pairs
    assert "config changed (pairs.dupe_factor: 2 -> 3)" in third["pairs"].data.tags["lightbert.reason"]
    # New versions of every model, under the same protocol: each takes the champion alias only if it
    # beats version 1 on the validation metric (a collapsed model has none, and cannot).
    report3 = json.loads((workdir / "evaluate" / "report.json").read_text())
    assert report3["protocol"]["fingerprint"] == report["protocol"]["fingerprint"]
    for entry in report3["models"]:
        name = entry["registered_name"]
        tags = {v: client.get_model_version(name, v).tags for v in ("1", "2")}
        old, new = (float(tags[v]["metric.downstream_validation"]) if "metric.downstream_validation" in tags[v]
                    else None for v in ("1", "2"))
        assert new == entry["downstream_validation"]
        promoted = new is not None and (old is None or new > old)
        assert str(client.get_model_version_by_alias(name, "champion").version) == ("2" if promoted else "1")


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "lightbert"), *args]


@pytest.mark.slow
def test_cli_resumes_after_kill_9_without_redoing_finished_stages(tmp_path, text_corpus):
    workdir = tmp_path / "wd"
    conf = tmp_path / "tiny.yaml"
    cfg, _ = load_config("smoke", overrides=tiny_overrides(text_corpus, "pairs.dupe_factor=60"))
    data = cfg.model_dump(mode="json")
    conf.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    cmd = _cli("run", "--preset", "smoke", "--config", str(conf), "--workdir", str(workdir), "--until", "pairs")

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list((workdir / ".partial").glob("pairs-*")):
            assert proc.poll() is None, "the run ended before the pairs stage started"
            assert time.monotonic() < deadline, "pairs stage never started"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (workdir / "pairs").exists()
    finished = {s: (workdir / s / "manifest.json").read_bytes() for s in ("corpus", "tokenizer")}
    files_before = {s: read_manifest(workdir / s)["files"] for s in finished}

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage, manifest in finished.items():
        assert (workdir / stage / "manifest.json").read_bytes() == manifest  # not recomputed
        assert read_manifest(workdir / stage)["files"] == files_before[stage]
    assert read_manifest(workdir / "pairs")["counts"]["examples_train"] > 0
    _, parents, children = _runs(workdir)
    last = children[parents[-1].info.run_id]
    assert last["corpus"].data.tags["lightbert.cached"] == "true"
    assert last["pairs"].data.tags["lightbert.cached"] == "false"


def test_cli_reports_config_errors_and_unbuilt_stages(tmp_path):
    env = dict(os.environ)
    bad = subprocess.run(_cli("run", "--preset", "smoke", "--set", "pairs.max_seq_length=3"),
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "pairs.max_seq_length: unknown key" in bad.stderr
    later = subprocess.run(_cli("run", "--preset", "smoke", "--until", "deploy"),
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert later.returncode == 2 and "unknown stage" in later.stderr and "evaluate" in later.stderr
    assert not (tmp_path / "workdir").exists()
    shown = subprocess.run(_cli("config", "--preset", "smoke", "--set", "pairs.dupe_factor=9"),
                           capture_output=True, text=True)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["pairs"]["dupe_factor"] == 9
