"""--tracking-uri pointing at a real MLflow server on 127.0.0.1 instead of the workdir's sqlite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from helpers import tiny_overrides, wait_until_healthy

from tasks.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", proc, 90, "mlflow server")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_runs_land_on_the_server_not_in_the_workdir(prefect_harness, mlflow_server, text_corpus, workdir):
    import mlflow

    from flows.pipeline import lightbert_pipeline

    cfg, _ = load_config("smoke", overrides=tiny_overrides(text_corpus))
    lightbert_pipeline(cfg.model_dump(mode="json"), str(workdir), until="tokenizer",
                       tracking_uri=mlflow_server, preset="smoke")
    assert not (workdir / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("lightbert")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"corpus", "tokenizer"} <= set(runs)
    tok_run = runs["tokenizer"].info.run_id
    assert "manifest.json" in {a.path for a in client.list_artifacts(tok_run)}
    assert any(a.path.endswith("tokenizer.json") for a in client.list_artifacts(tok_run, "outputs"))
