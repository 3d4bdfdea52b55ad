"""Scheduled runs and the servers behind them: a Prefect deployment of the pipeline on a cron schedule,
served by the calling process, and Prefect's and MLflow's servers bound to 127.0.0.1.

A scheduled run is an ordinary pipeline run with the parameters fixed when `lightbert serve` started:
every stage is reused when its cache key still matches (tasks/stage.py), so an unchanged run takes
seconds and a changed source file rebuilds from the first stage whose key changed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import ConfigError

HOST = "127.0.0.1"
START_PREFECT = f"`lightbert server` (or `prefect server start --host {HOST} --port 4200`)"


def schedule_for(cron: str, timezone: str = "UTC"):
    """The Prefect cron schedule, or a ConfigError naming the fix."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    fixes = {"cron": f"--cron {cron!r}: {{}}; give five fields, minute hour day-of-month month day-of-week, "
                     "e.g. --cron \"0 3 * * *\" (every day at 03:00) or \"*/30 * * * *\" (every 30 minutes)",
             "timezone": f"--timezone {timezone!r}: {{}}; give an IANA time zone such as UTC or Europe/Paris"}
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        problems = [fixes.get(str(e["loc"][0]) if e["loc"] else "", "{}").format(
            str(e["msg"]).removeprefix("Value error, ")) for e in exc.errors()]
        raise ConfigError("; ".join(problems)) from None
    from prefect.schedules import Cron

    return Cron(cron, timezone=timezone)


def build_deployment(config: dict[str, Any], workdir: Path, cron: str, *, name: str, preset: str,
                     until: str | None = None, tracking_uri: str | None = None, timezone: str = "UTC"):
    """A deployment of the `lightbert-pipeline` flow with this schedule and these flow parameters."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import lightbert_pipeline

    parameters = {"config": config, "workdir": str(Path(workdir).resolve()), "until": until,
                  "tracking_uri": tracking_uri, "preset": preset}
    return lightbert_pipeline.to_deployment(
        name=name, schedules=[schedule_for(cron, timezone)], parameters=parameters,
        description=f"lightbert pipeline, preset {preset}, workdir {parameters['workdir']}, "
                    f"until {until or 'the last stage'}; scheduled '{cron}' ({timezone}).",
        tags=["lightbert", preset],
        # Found by import (the installed package), whatever directory the server was started from.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def require_prefect_server() -> str:
    """The URL of the Prefect server schedules will be kept on; a ConfigError when there is none.

    Without PREFECT_API_URL, Prefect runs flows against a temporary server that dies with the process
    and never fires a schedule.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "scheduled runs need a running Prefect server and PREFECT_API_URL is not set. Start one with "
            f"{START_PREFECT}, then `export PREFECT_API_URL=http://{HOST}:4200/api` and run this again")
    problem = get_client(sync_client=True).api_healthcheck()
    if problem is not None:
        raise ConfigError(f"no Prefect server answers at PREFECT_API_URL={url} ({problem}); start one with "
                          f"{START_PREFECT} or fix PREFECT_API_URL")
    return url


def serve_deployment(deployment) -> None:
    """Register the deployment and run its scheduled runs until Ctrl-C (one run at a time; the
    schedule is paused on exit so runs do not pile up while nothing serves them)."""
    from prefect import serve

    serve(deployment, limit=1, pause_on_shutdown=True)


# ------------------------------------------------------------------------------------------------
# the servers
# ------------------------------------------------------------------------------------------------
def mlflow_server_command(workdir: Path, port: int) -> list[str]:
    """MLflow's server on the workdir's sqlite store, light enough for a laptop: one worker, and
    (through the environment, see server_env) no job-execution workers."""
    wd = Path(workdir).resolve()
    return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{wd / 'mlflow.db'}",
            "--default-artifact-root", (wd / "mlruns").as_uri(), "--workers", "1"]


def prefect_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def server_env() -> dict[str, str]:
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")


def check_port_free(port: int, flag: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError:
            raise ConfigError(f"port {port} on {HOST} is already in use (a server already running?); "
                              f"stop it or pass another {flag}") from None


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        if proc.poll() is not None:
            raise ConfigError(f"{what} exited with code {proc.returncode} before answering {url}")
        if time.monotonic() > deadline:
            raise ConfigError(f"{what} did not answer {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


# The MLflow 3 UI (a hash-routed single-page app) opens on its home page, and with no workflow chosen
# yet in the browser (localStorage "mlflow.workflowType") that is the GenAI view: traces, "No data
# available". This route is the experiment page's "Runs" tab (routes `/experiments/:experimentId/runs`,
# tab "runs", in mlflow/server/js/build/static/js/main.*.js); workflowType=machine_learning picks the
# "Model training" navigation (it overrides the stored choice) and compareRunsMode=TABLE the runs table
# rather than the charts. The experiment's tag mlflow.experimentKind=custom_model_development
# (flows/tracking.py) makes /experiments/<id> itself redirect to the same tab.
RUNS_VIEW_QUERY = "workflowType=machine_learning&compareRunsMode=TABLE"
# Consoles' browsers (webbrowser.GenericBrowser: lynx, w3m, www-browser...) would take over the terminal.
_CONSOLE_BROWSER = "GenericBrowser"


def experiment_runs_url(base_url: str, experiment_id: str | None) -> str:
    """The UI page listing an experiment's training runs (the experiments list when there is none)."""
    base = base_url.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?{RUNS_VIEW_QUERY}"


def ui_experiment(workdir: Path, name: str | None = None) -> tuple[str, str] | None:
    """(id, name) of the experiment `lightbert ui` opens in the workdir's store: `name` when given
    (a ConfigError if the store has no such experiment), else the one holding the latest pipeline run,
    else the default experiment "lightbert"; None when the store has none of them."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}")
    if name is not None:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise ConfigError(f"--experiment {name!r}: no such experiment in {workdir / 'mlflow.db'} "
                              f"(experiments there: {known})")
        return exp.experiment_id, exp.name
    experiments = {e.experiment_id: e for e in client.search_experiments()}
    if experiments:
        latest = client.search_runs(list(experiments), filter_string="tags.`lightbert.kind` = 'pipeline'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        if latest:
            exp = experiments[latest[0].info.experiment_id]
            return exp.experiment_id, exp.name
    exp = client.get_experiment_by_name("lightbert")
    return (exp.experiment_id, exp.name) if exp is not None else None


def can_open_browser() -> bool:
    """Whether opening a browser makes sense here: not under tests, and a display on Linux/BSD."""
    if os.environ.get("PYTEST_CURRENT_TEST") or os.environ.get("CI"):
        return False
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_browser(url: str) -> bool:
    """Open `url` in the user's graphical browser, when there is one; True if one was asked to."""
    import webbrowser

    if not can_open_browser():
        return False
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    if type(browser).__name__ == _CONSOLE_BROWSER:
        return False
    return bool(browser.open(url))


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group started for a server, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_servers(workdir: Path, prefect_port: int, mlflow_port: int,
                announce: Callable[[dict[str, str], dict[str, Path]], None]) -> None:
    """Start Prefect's and MLflow's servers on 127.0.0.1, wait until both answer, call
    `announce(env, logs)` with the environment variables that point lightbert at them, then block
    until Ctrl-C (KeyboardInterrupt) or until one of them stops (ConfigError). Both are stopped on
    the way out.

    Logs go to <workdir>/logs/. Prefect's own database stays in PREFECT_HOME (~/.prefect by default).
    """
    wd = Path(workdir).resolve()
    check_port_free(prefect_port, "--prefect-port")
    check_port_free(mlflow_port, "--mlflow-port")
    (wd / "logs").mkdir(parents=True, exist_ok=True)
    servers = {
        "Prefect server": (prefect_server_command(prefect_port), f"http://{HOST}:{prefect_port}/api/health",
                           wd / "logs" / "prefect-server.log"),
        "MLflow server": (mlflow_server_command(wd, mlflow_port), f"http://{HOST}:{mlflow_port}/health",
                          wd / "logs" / "mlflow-server.log"),
    }
    procs: dict[str, subprocess.Popen] = {}
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for what, (cmd, _, log) in servers.items():
            with open(log, "ab") as out:
                # Own process groups: Ctrl-C reaches this process only, which then stops each server.
                procs[what] = subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
        for what, (_, health, log) in servers.items():
            try:
                wait_healthy(health, procs[what], what)
            except ConfigError as exc:
                raise ConfigError(f"{exc}; see {log}") from None
        announce({"PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
                  "MLFLOW_TRACKING_URI": f"http://{HOST}:{mlflow_port}"},
                 {what: log for what, (_, _, log) in servers.items()})
        while True:
            for what, proc in procs.items():
                if proc.poll() is not None:
                    raise ConfigError(f"{what} stopped (exit code {proc.returncode}); see {servers[what][2]}")
            time.sleep(1.0)
    finally:
        for proc in procs.values():
            stop_process_group(proc)
        signal.signal(signal.SIGTERM, previous)
