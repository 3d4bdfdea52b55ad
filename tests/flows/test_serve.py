"""`lightbert serve`: the deployment it registers carries its cron schedule and the CLI's parameters
(read back from a Prefect server, without waiting for the schedule to fire); a scheduled run with
those parameters reuses everything until a source file changes; clear errors without a server or
with a bad cron."""

from __future__ import annotations

import mlflow
import pytest
from helpers import tiny_overrides
from typer.testing import CliRunner

from flows import serve as serve_module
from flows.cli import app
from tasks.config import load_config

CRON = "0 3 * * *"


def _stage_runs_of_last_pipeline_run(workdir) -> dict[str, dict[str, str]]:
    """{stage: tags} of the nested runs under the newest parent run in the workdir's store."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lightbert")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("lightbert.kind") == "pipeline")
    return {r.info.run_name: r.data.tags for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def test_schedule_is_checked_without_a_server():
    from flows.pipeline import lightbert_pipeline

    dep = serve_module.build_deployment({"run": {}}, "rel/dir", CRON, name="nightly", preset="smoke",
                                        timezone="Europe/Paris")
    assert dep.schedules[0].schedule.cron == CRON and dep.schedules[0].schedule.timezone == "Europe/Paris"
    assert dep.flow_name == lightbert_pipeline.name and dep.entrypoint == "flows.pipeline.lightbert_pipeline"
    assert dep.parameters["workdir"].startswith("/")  # absolute: the runner may start elsewhere


@pytest.mark.parametrize("cron, timezone, expected", [
    ("61 3 * * *", "UTC", "--cron '61 3 * * *': Invalid cron string"),
    ("0 3 * *", "UTC", "give five fields"),
    (CRON, "Mars/Olympus", "--timezone 'Mars/Olympus'"),
])
def test_invalid_cron_is_refused_with_the_fix(cron, timezone, expected):
    result = CliRunner().invoke(app, ["serve", "--preset", "smoke", "--cron", cron, "--timezone", timezone])
    assert result.exit_code == 2 and expected in result.output


def test_serve_without_a_prefect_server_says_how_to_start_one(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even inside the test harness
        result = CliRunner().invoke(app, ["serve", "--preset", "smoke", "--cron", CRON])
    assert result.exit_code == 2
    assert "PREFECT_API_URL is not set" in result.output and "lightbert server" in result.output
    assert "export PREFECT_API_URL=http://127.0.0.1:4200/api" in result.output


@pytest.mark.slow
def test_served_deployment_keeps_its_schedule_and_reruns_from_the_changed_stage(
        prefect_harness, monkeypatch, text_corpus, workdir):
    from prefect.client.orchestration import get_client

    from flows.pipeline import lightbert_pipeline

    applied = []
    # Register the deployment the CLI builds, as serving would, instead of blocking on it.
    monkeypatch.setattr(serve_module, "serve_deployment", lambda dep: applied.append(dep.apply()))
    overrides = tiny_overrides(text_corpus)
    args = ["serve", "--cron", CRON, "--timezone", "UTC", "--preset", "smoke", "--workdir", str(workdir),
            "--until", "tokenizer", "--name", "nightly"]
    result = CliRunner().invoke(app, args + [a for o in overrides for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    assert "serving deployment lightbert-pipeline/nightly" in result.output

    deployment = get_client(sync_client=True).read_deployment(applied[0])
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]
    assert deployment.schedules[0].schedule.timezone == "UTC" and deployment.schedules[0].active
    cfg, _ = load_config("smoke", overrides=overrides)
    params = deployment.parameters
    assert params == {"config": cfg.model_dump(mode="json"), "workdir": str(workdir.resolve()),
                      "until": "tokenizer", "tracking_uri": None, "preset": "smoke"}

    # What each scheduled run does: the flow with the deployment's parameters.
    lightbert_pipeline(**params)
    lightbert_pipeline(**params)
    assert {s: t["lightbert.cached"] for s, t in _stage_runs_of_last_pipeline_run(workdir).items()} == {
        "corpus": "true", "tokenizer": "true"}
    first = sorted(text_corpus.iterdir())[0]
    first.write_text(first.read_text() + "The harbour opened a new bridge in 1901.\n")
    lightbert_pipeline(**params)
    third = _stage_runs_of_last_pipeline_run(workdir)
    assert {s: t["lightbert.cached"] for s, t in third.items()} == {"corpus": "false", "tokenizer": "false"}
    assert third["corpus"]["lightbert.reason"].startswith("config changed (local_inputs")
    assert third["tokenizer"]["lightbert.reason"] == "upstream changed (corpus)"
