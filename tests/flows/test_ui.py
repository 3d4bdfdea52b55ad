"""`lightbert ui` serves this workdir's runs: the real command, on 127.0.0.1 only, one worker, checked
through MLflow's REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_overrides, wait_until_healthy

from tasks.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def _session_commands(sid: int) -> list[list[str]]:
    """Command lines of the processes in session `sid` (the ui command and what it started)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            out.append([part.decode() for part in cmdline if part])
    return out


@pytest.mark.slow
def test_ui_serves_this_workdirs_runs_on_loopback_with_one_worker(prefect_harness, text_corpus, workdir):
    from flows.pipeline import lightbert_pipeline

    cfg, _ = load_config("smoke", overrides=tiny_overrides(text_corpus))
    lightbert_pipeline(cfg.model_dump(mode="json"), str(workdir), until="corpus", preset="smoke")

    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lightbert"), "ui", "--workdir", str(workdir),
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", proc, 120, "lightbert ui")

        experiments = _api(f"{url}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        exp = next(e for e in experiments if e["name"] == "lightbert")
        assert exp["artifact_location"] == (workdir / "mlruns").as_uri()
        runs = _api(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parent = next(t for t in tags if t.get("lightbert.kind") == "pipeline")
        assert parent["lightbert.workdir"] == str(workdir.resolve())
        corpus = next(r for r, t in zip(runs, tags, strict=True) if t.get("lightbert.stage") == "corpus")
        assert corpus["info"]["status"] == "FINISHED" and corpus["info"]["run_name"] == "corpus"
        assert {m["key"] for m in corpus["data"]["metrics"]} >= {"documents_train", "stage_seconds"}

        assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only, nothing on other interfaces
        servers = [cmd for cmd in _session_commands(proc.pid) if "uvicorn" in cmd]
        assert len(servers) == 1 and servers[0][servers[0].index("--workers") + 1] == "1", servers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _kill_sessions_of(argument: str) -> None:
    """SIGKILL the process group of every process whose command line holds `argument` (NUL-separated)."""
    for proc in Path("/proc").iterdir():
        try:
            if argument.encode() in (proc / "cmdline").read_bytes() + b"\0":
                os.killpg(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.mark.slow
def test_server_starts_prefect_and_mlflow_on_loopback_and_ctrl_c_stops_both(tmp_path):
    """`lightbert server`: both servers answer on 127.0.0.1 only, the printed exports point at them, and
    Ctrl-C (SIGINT) stops both and frees the ports."""
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    cmd = [str(Path(sys.executable).parent / "lightbert"), "server", "--workdir", str(tmp_path / "wd"),
           "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    # A shell's background job starts with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the command the disposition it has when a person runs it in a terminal.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 150
        lines = []
        while not any("Ctrl-C stops both servers" in line for line in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "lightbert server did not report both servers up"
            lines.append(proc.stdout.readline())
        output = "".join(lines)
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in output
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in output
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/api/health", timeout=10) as r:
            assert r.status == 200
        assert "experiments" in _api(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search",
                                     {"max_results": 10})
        for port in (prefect_port, mlflow_port):
            assert set(_listening_addresses(port)) == {"0100007F"}  # 127.0.0.1, nothing else
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "servers stopped" in proc.stdout.read()
        for port in (prefect_port, mlflow_port):
            assert _listening_addresses(port) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for port in (prefect_port, mlflow_port):  # servers a failed run left behind (own sessions)
            _kill_sessions_of(f"--port\0{port}\0")


@pytest.mark.slow
def test_ui_prints_and_serves_the_experiments_training_runs_view(prefect_harness, text_corpus, workdir):
    """`lightbert ui` lands on the experiment's runs table, not on MLflow's GenAI home page: it prints
    the runs view's URL (the experiment's id, the runs tab, the model-training workflow), the real
    server answers its base path with the UI whose bundle routes that view, and the experiment carries
    the kind that makes the UI treat it as model training."""
    import queue
    import threading

    import mlflow

    from flows.pipeline import lightbert_pipeline

    cfg, _ = load_config("smoke", overrides=tiny_overrides(text_corpus))
    lightbert_pipeline(cfg.model_dump(mode="json"), str(workdir), until="corpus", preset="smoke")
    exp = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}").get_experiment_by_name("lightbert")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    lightbert = str(Path(sys.executable).parent / "lightbert")
    port = _free_port()
    proc = subprocess.Popen([lightbert, "ui", "--workdir", str(workdir), "--port", str(port), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 120, []
        while not any(line.startswith("    http://") for line in seen):
            assert proc.poll() is None, "".join(seen)[-3000:]
            assert time.monotonic() < deadline, "lightbert ui printed no URL: " + "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
        url = next(line for line in seen if line.startswith("    http://")).strip()
        assert any(f"training runs of experiment 'lightbert' (id {exp.experiment_id})" in line for line in seen)
        base, _, route = url.partition("#")
        assert base == f"http://127.0.0.1:{port}/"
        assert route == f"/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&compareRunsMode=TABLE"

        with urllib.request.urlopen(base, timeout=10) as response:  # the page the browser loads first
            assert response.status == 200
            page = response.read().decode()
        bundle = next(part.split('"')[0] for part in page.split('src="')[1:] if "static/js/main." in part)
        with urllib.request.urlopen(base + bundle.lstrip("/"), timeout=30) as response:
            js = response.read().decode()
        # the UI this server ships routes the printed view: the runs tab, and the two query parameters
        assert '"/experiments/:experimentId/runs"' in js
        assert 'e.MACHINE_LEARNING="machine_learning"' in js and 'get("workflowType")' in js
        assert '"mlflow.experimentKind"' in js and '"custom_model_development"' in js
        experiments = _api(f"{base}api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        served = next(e for e in experiments if e["experiment_id"] == exp.experiment_id)
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in served["tags"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _listening_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _listening_addresses(port) == []  # SIGTERM to `lightbert ui` stopped its server too

    unknown = subprocess.run([lightbert, "ui", "--workdir", str(workdir), "--port", str(_free_port()),
                              "--experiment", "nosuch", "--no-browser"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "--experiment 'nosuch': no such experiment" in unknown.stderr
