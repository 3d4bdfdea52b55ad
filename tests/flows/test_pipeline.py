"""The real chain under Prefect and MLflow: tracked runs, reuse, resume after kill -9, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import socket
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
    assert logged == {"outputs/plots/accuracy_vs_parameters.png", "outputs/plots/accuracy_vs_cpu_latency.png",
                      "outputs/plots/deployment_accuracy_vs_latency.png"}
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


def _slow_pairs_run(tmp_path: Path, text_corpus: Path, api_url: str) -> tuple[Path, list[str], dict[str, str]]:
    """(workdir, command, env) of a `lightbert run --until pairs` whose pairs stage lasts long enough to be
    killed in the middle: a shard per two documents, 1,500 copies each. Measured here: 60 copies in one shard
    took 0.3 s and the stage sometimes ended before a poll saw its MLflow run; 600 copies in 23 shards 2.7 s.
    The runs use the session's Prefect server (`api_url`), as a user with a server does: a temporary server
    per run took 20-30 s to start on a slow 2-core machine, and each of these tests runs the CLI twice."""
    conf = tmp_path / "tiny.yaml"
    cfg, _ = load_config("smoke", overrides=tiny_overrides(text_corpus, "pairs.dupe_factor=1500",
                                                           "pairs.chunk_documents=2"))
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=api_url)
    workdir = tmp_path / "wd"
    return workdir, _cli("run", "--preset", "smoke", "--config", str(conf), "--workdir", str(workdir), "--until",
                         "pairs"), env


@pytest.mark.slow
def test_cli_resumes_after_kill_9_without_redoing_finished_stages(prefect_harness, tmp_path, text_corpus):
    workdir, cmd, env = _slow_pairs_run(tmp_path, text_corpus, prefect_harness)
    log = tmp_path / "killed-run.log"
    proc = _start_logged(cmd, env, log)
    deadline = time.monotonic() + 240
    try:
        while not list((workdir / ".partial").glob("pairs-*")):
            assert proc.poll() is None, "the run ended before the pairs stage started: " + _ended(proc, log)
            assert time.monotonic() < deadline, "pairs stage never started"
            time.sleep(0.02)
    finally:
        _kill_group(proc)
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


def _start_logged(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The run in its own process group, its output in `log` so that a failure can say why it ended."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ended(proc: subprocess.Popen, log: Path) -> str:
    return f"exit {proc.returncode}; its output ends:\n{log.read_text(errors='replace')[-3000:]}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had already ended: the assertion that saw it says why
        pass
    proc.wait(timeout=60)


def _wait_for(what: str, check, proc: subprocess.Popen, log: Path, deadline: float):
    """Poll `check()` until it returns something truthy; fail if `proc` exits first or time runs out.
    A store read that hits the writer's lock (sqlite) is retried."""
    from mlflow.exceptions import MlflowException

    while True:
        try:
            found = check()
        except MlflowException:
            found = None
        if found:
            return found
        assert proc.poll() is None, f"the run ended before {what}: " + _ended(proc, log)
        assert time.monotonic() < deadline, f"{what}: not within the time allowed"
        time.sleep(0.05)


@pytest.mark.slow
def test_rerun_marks_the_runs_a_kill_9_left_running_as_killed(prefect_harness, tmp_path, text_corpus):
    """A run killed with kill -9 cannot end its MLflow runs: the next run on the workdir (holding the
    workdir lock, so the killed one is surely dead) marks them KILLED and tags them with itself. Runs of
    another workdir, or of this path on another host, stay as they are."""
    import mlflow

    workdir, cmd, env = _slow_pairs_run(tmp_path, text_corpus, prefect_harness)
    log = tmp_path / "killed-run.log"
    proc = _start_logged(cmd, env, log)
    deadline = time.monotonic() + 240
    try:
        # The run creates the store (and its tables): open it only once a later stage is being built.
        _wait_for("the pairs stage started", lambda: list((workdir / ".partial").glob("pairs-*")), proc, log,
                  deadline)
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        exp_id = client.get_experiment_by_name("lightbert").experiment_id

        def running_pairs_run():
            runs = client.search_runs([exp_id], filter_string="tags.`lightbert.stage` = 'pairs'")
            return [r for r in runs if r.info.status == "RUNNING"]

        killed_pairs = _wait_for("a RUNNING pairs stage run", running_pairs_run, proc, log, deadline)[0]
    finally:
        _kill_group(proc)
    killed_parent_id = killed_pairs.data.tags["mlflow.parentRunId"]
    assert client.get_run(killed_parent_id).info.status == "RUNNING"  # what the UI showed forever
    assert killed_pairs.data.tags["lightbert.workdir"] == str(workdir.resolve())
    # RUNNING runs that are not this workdir's on this host: another workdir, and this path elsewhere.
    foreign = [client.create_run(exp_id, tags={"lightbert.kind": "pipeline", "lightbert.workdir": wd,
                                               "lightbert.host": host}).info.run_id
               for wd, host in ((str(tmp_path / "other"), socket.gethostname()),
                                (str(workdir.resolve()), "another-host.invalid"))]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = client.search_runs([exp_id], order_by=["attributes.start_time ASC"])
    by_id = {r.info.run_id: r for r in runs}
    mine = [r for r in runs if r.info.run_id not in foreign]
    assert [r.info.run_name for r in mine if r.info.status == "RUNNING"] == []
    resumer = [r for r in mine if r.data.tags.get("lightbert.kind") == "pipeline"][-1]
    resumer_id = resumer.info.run_id
    assert resumer_id != killed_parent_id and resumer.info.status == "FINISHED"
    killed = [r for r in mine if r.info.status == "KILLED"]
    assert {r.info.run_id for r in killed} == {killed_parent_id, killed_pairs.info.run_id}
    for run in killed:
        assert run.data.tags["lightbert.resumed_by"] == resumer_id
        assert run.info.end_time is not None and run.info.end_time >= run.info.start_time
    assert set(resumer.data.tags["lightbert.closed_runs"].split(",")) == {killed_parent_id, killed_pairs.info.run_id}
    assert resumer.data.tags["lightbert.resumed_from"] == killed_parent_id
    # the stages the killed run finished stay FINISHED, untouched
    finished = [r for r in mine if r.data.tags.get("mlflow.parentRunId") == killed_parent_id
                and r.info.run_id != killed_pairs.info.run_id]
    assert {r.info.run_name for r in finished} == {"corpus", "tokenizer"}
    assert all(r.info.status == "FINISHED" and "lightbert.resumed_by" not in r.data.tags for r in finished)
    # every stage run of the rerun carries the workdir, so a later rerun can find it if this one dies
    stage_runs = [r for r in mine if r.data.tags.get("mlflow.parentRunId") == resumer_id]
    assert {r.info.run_name for r in stage_runs} == {"corpus", "tokenizer", "pairs"}
    assert all(r.data.tags["lightbert.workdir"] == str(workdir.resolve()) for r in stage_runs)
    for run_id in foreign:
        assert by_id[run_id].info.status == "RUNNING" and "lightbert.resumed_by" not in by_id[run_id].data.tags


def test_run_summary_lists_the_stages_warnings(tmp_path, text_corpus):
    """A zip named .txt among the corpus files is skipped, and `lightbert run` says so at the end of its
    summary with the file's name and why (the corpus is built from the text files only)."""
    import zipfile

    with zipfile.ZipFile(text_corpus / "archive.txt", "w") as z:
        z.writestr("inner.txt", "some text")
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    args = [a for o in tiny_overrides(text_corpus) for a in ("--set", o)]
    done = subprocess.run(_cli("run", "--preset", "smoke", *args, "--workdir", str(tmp_path / "wd"),
                               "--until", "corpus"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.split("stage         output", 1)[1]
    assert "1 warning(s):" in summary
    assert "archive.txt (binary: a zip archive)" in summary
