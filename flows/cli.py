"""`lightbert` command line: run the pipeline or serve it on a schedule, show the resolved configuration,
start the servers and the MLflow UI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from tasks.config import PRESETS, ConfigError, dump_config, load_config
from tasks.pipeline import STAGES, TRAINING_STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress BERT into DistilBERT and ALBERT students: a Prefect + MLflow pipeline.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file merged over the preset.")]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", help=f"{' | '.join(PRESETS)}; default: gpu when CUDA is available, else cpu.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override one key, e.g. --set pairs.max_seq_len=64 (repeatable).")]
WorkdirOpt = Annotated[Path | None, typer.Option(help="Where stage outputs and mlflow.db live; "
                                                      "default ./workdir/<preset>.")]
UntilOpt = Annotated[str | None, typer.Option(help="Last stage to run: " + ", ".join(STAGES))]
TrackingOpt = Annotated[str | None, typer.Option(
    envvar="MLFLOW_TRACKING_URI", show_envvar=True,
    help="MLflow tracking URI (a server: http://127.0.0.1:5000); default sqlite:///<workdir>/mlflow.db")]


def _quiet_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The stages' progress lines (logging, logger "tasks.*") go to the Prefect run's log and the console.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
    # A run without PREFECT_API_URL starts a temporary Prefect server and gives up when it does not answer
    # within 20 s (Prefect's default). A 2-core machine measured 15 s when idle and sometimes more under
    # load, which made a run fail before its first stage: wait up to 2 minutes.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _default_workdir(preset: str) -> Path:
    return Path("workdir") / preset


def _resolve_run(config: Path | None, preset: str | None, overrides: list[str] | None, until: str | None,
                 workdir: Path | None):
    """What `run` and `serve` share: the validated configuration, the preset and the absolute workdir."""
    try:
        cfg, preset_name = load_config(preset, config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    if until is not None and until not in STAGES:
        _fail(f"--until {until}: unknown stage; choose one of: {', '.join(STAGES)}")
    return cfg, preset_name, (workdir or _default_workdir(preset_name)).resolve()


@app.command()
def run(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    workdir: WorkdirOpt = None,
    overrides: SetOpt = None,
    until: UntilOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run the pipeline; finished stages whose inputs did not change are reused."""
    _quiet_defaults()
    cfg, preset_name, wd = _resolve_run(config, preset, overrides, until, workdir)

    from flows.pipeline import lightbert_pipeline
    from flows.stages import stages_until
    from flows.tracking import default_tracking_uri
    from tasks.stage import StageError, read_manifest

    typer.echo(f"lightbert: preset={preset_name} workdir={wd} stages={','.join(stages_until(until))}")
    try:
        outputs = lightbert_pipeline(cfg.model_dump(mode="json"), str(wd), until=until,
                                     tracking_uri=tracking_uri, preset=preset_name)
    except (ConfigError, StageError) as exc:
        _fail(str(exc), code=1)
    typer.echo("\nstage         output")
    warnings = []
    for stage, out in outputs.items():
        manifest = read_manifest(Path(out)) or {}
        typer.echo(f"{stage:<13} {out}  ({manifest.get('timings', {}).get('seconds', 0):.1f}s)")
        warnings += manifest.get("details", {}).get("warnings", [])
    if warnings:  # what a stage found worth fixing: skipped files, dropped documents, [UNK] rate...
        typer.secho(f"\n{len(warnings)} warning(s):", fg=typer.colors.YELLOW)
        for warning in warnings:
            typer.secho(f"  - {warning}", fg=typer.colors.YELLOW)
    if "evaluate" in outputs:
        report = Path(outputs["evaluate"]) / "report.md"
        tables = report.read_text(encoding="utf-8").split("\n## How it was measured")[0].rstrip()
        typer.echo(f"\n{tables}\n\nreport (with how each figure was measured): {report}")
    uri = tracking_uri or default_tracking_uri(wd)
    typer.echo(f"\nMLflow: {uri}\n  browse with: lightbert ui --workdir {wd}")


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help='When to run, as cron: minute hour day month weekday, '
                                           'e.g. "0 3 * * *" = every day at 03:00.')],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    workdir: WorkdirOpt = None,
    overrides: SetOpt = None,
    until: UntilOpt = None,
    tracking_uri: TrackingOpt = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of --cron, e.g. Europe/Paris.")] = "UTC",
    name: Annotated[str | None, typer.Option(help="Deployment name; default lightbert-<preset>.")] = None,
) -> None:
    """Serve the pipeline on a cron schedule (a Prefect deployment; needs `lightbert server`).

    Each scheduled run reuses every stage whose inputs did not change and rebuilds from the first
    stage whose inputs did."""
    _quiet_defaults()
    cfg, preset_name, wd = _resolve_run(config, preset, overrides, until, workdir)
    from flows.serve import build_deployment, require_prefect_server, schedule_for, serve_deployment

    try:
        schedule_for(cron, timezone)
        api_url = require_prefect_server()
        deployment = build_deployment(cfg.model_dump(mode="json"), wd, cron, preset=preset_name, until=until,
                                      name=name or f"lightbert-{preset_name}", tracking_uri=tracking_uri,
                                      timezone=timezone)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"lightbert: serving deployment lightbert-pipeline/{deployment.name} on {api_url}: "
               f"'{cron}' ({timezone}), preset={preset_name} workdir={wd} until={until or 'all'}\n"
               "  the configuration is fixed now: restart `lightbert serve` after changing it. Ctrl-C stops "
               "serving and pauses the schedule.")
    serve_deployment(deployment)


@app.command()
def train(
    stage: Annotated[str, typer.Argument(help="The training stage: " + ", ".join(TRAINING_STAGES))],
    workdir: Annotated[Path, typer.Option(help="The workdir whose upstream stages are finished "
                                               "(`lightbert run --until <the stage before>`).")],
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Build one training stage without Prefect or MLflow; under torchrun, on every GPU (every rank runs it):

        torchrun --nproc_per_node 8 -m flows.cli train distilbert --preset gpu --workdir W

    The finished stage has the cache key `lightbert run` computes, so a later run on W reuses it."""
    _quiet_defaults()
    import logging

    from tasks.stage import StageError
    from tasks.train import train_stage

    logging.basicConfig(format="%(message)s")  # no Prefect here: the stages' progress lines go to stderr
    logging.getLogger("tasks").setLevel(logging.INFO)

    try:
        outcome = train_stage(stage, workdir, preset, config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    except StageError as exc:
        _fail(str(exc), code=1)
    if outcome is not None:
        typer.echo(outcome)


@app.command("config")
def show_config(config: ConfigOpt = None, preset: PresetOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved configuration (preset + file + --set), after validation."""
    try:
        cfg, preset_name = load_config(preset, config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"# preset: {preset_name}\n{dump_config(cfg)}", nl=False)


def _store_workdir(workdir: Path | None) -> Path:
    """The workdir whose MLflow store `ui` and `server` open: as `run` would pick it by default."""
    if workdir is not None:
        return workdir.resolve()
    from tasks.config import default_preset

    return _default_workdir(default_preset()).resolve()


@app.command()
def ui(
    workdir: Annotated[Path | None, typer.Option(help="The workdir whose mlflow.db to browse; default "
                                                      "./workdir/<default preset>.")] = None,
    port: int = 5000,
    experiment: Annotated[str | None, typer.Option(
        help="The experiment whose runs to open; default: the one of the latest pipeline run.")] = None,
    no_browser: Annotated[bool, typer.Option(
        "--no-browser", envvar="LIGHTBERT_NO_BROWSER", show_envvar=True,
        help="Only print the URL; by default a browser opens on it when there is a display.")] = False,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for a workdir's store (one worker: light on a laptop), and open
    it on the experiment's training runs."""
    import signal
    import sys

    from flows.serve import (
        HOST,
        check_port_free,
        experiment_runs_url,
        mlflow_server_command,
        open_browser,
        server_env,
        stop_process_group,
        ui_experiment,
        wait_healthy,
    )

    wd = _store_workdir(workdir)
    db = wd / "mlflow.db"
    if not db.is_file():
        _fail(f"{db} does not exist; run `lightbert run --workdir {wd}` first or pass --workdir")
    try:
        check_port_free(port, "--port")
        found = ui_experiment(wd, experiment)
    except ConfigError as exc:
        _fail(str(exc))
    base = f"http://{HOST}:{port}"
    url = experiment_runs_url(base, found[0] if found else None)
    typer.echo(f"starting the MLflow UI for {db} on {base} ...")
    # Its own process group, in this session: Ctrl-C and SIGTERM reach this process, which stops it.
    proc = subprocess.Popen(mlflow_server_command(wd, port), env=server_env(), stdin=subprocess.DEVNULL,
                            process_group=0)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 0
    try:
        try:
            wait_healthy(f"{base}/health", proc, "the MLflow UI")
        except ConfigError as exc:
            _fail(str(exc), code=1)
        what = f"training runs of experiment {found[1]!r} (id {found[0]})" if found else "experiments"
        typer.secho(f"\nMLflow UI, {what}:\n\n    {url}\n", bold=True)
        if not no_browser and open_browser(url):
            typer.echo("(opened in your browser)")
        typer.echo("Ctrl-C stops the UI.")
        code = proc.wait()
    except KeyboardInterrupt:
        typer.echo("\nMLflow UI stopped")
    finally:
        stop_process_group(proc)
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


@app.command()
def server(
    workdir: Annotated[Path | None, typer.Option(help="The workdir whose mlflow.db the MLflow server "
                                                      "uses; default ./workdir/<default preset>.")] = None,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
) -> None:
    """Start Prefect's and MLflow's servers on 127.0.0.1 (for `serve`); Ctrl-C stops both.

    Prefect's keeps deployments and schedules; MLflow's serves the workdir's store (tracking, registry,
    UI) with one worker. Prints the environment variables that point lightbert at them."""
    from flows.serve import run_servers

    wd = _store_workdir(workdir)

    def announce(env: dict[str, str], logs: dict[str, Path]) -> None:
        typer.echo(f"Prefect UI and API: http://127.0.0.1:{prefect_port}\n"
                   f"MLflow UI and tracking ({wd / 'mlflow.db'}): http://127.0.0.1:{mlflow_port}\n"
                   f"logs: {', '.join(str(p) for p in logs.values())}\n\nIn another shell:")
        for key, value in env.items():
            typer.echo(f"  export {key}={value}")
        typer.echo(f'  lightbert serve --cron "0 3 * * *" --workdir {wd}\n\nCtrl-C stops both servers.')

    typer.echo("starting Prefect's and MLflow's servers ...")
    try:
        run_servers(wd, prefect_port, mlflow_port, announce)
    except ConfigError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:
        typer.echo("\nservers stopped")


@app.command()
def verify(
    workdir: Annotated[Path | None, typer.Option(help="The workdir whose finished stages to re-hash; default "
                                                      "./workdir/<default preset>.")] = None,
) -> None:
    """Re-hash every file of every finished stage and name each one that changed (missing, size, sha256).

    `lightbert run` reuses a stage by its files' size, mtime and inode, without reading them; this reads
    them all, so it also finds a file damaged in place with its size and mtime kept. Exit code 1 when a
    file changed (the next `lightbert run` rebuilds what it can see; rebuild the rest with a fresh
    workdir or by deleting the stage's folder), 0 when every file matches its manifest."""
    import time

    from tasks.stage import verify_workdir

    def size(n: float) -> str:
        for unit in ("bytes", "KB", "MB", "GB", "TB"):
            if n < 1000 or unit == "TB":
                return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
            n /= 1000
        return ""  # unreachable

    wd = _store_workdir(workdir)
    if not wd.is_dir():
        _fail(f"{wd} does not exist; run `lightbert run --workdir {wd}` first, or pass the workdir to "
              "check with --workdir")
    t0 = time.perf_counter()
    results = verify_workdir(wd, STAGES)
    if not results:
        _fail(f"{wd} holds no finished stage (no <stage>/manifest.json); run `lightbert run --workdir {wd}` "
              "first, or pass the workdir to check with --workdir")
    typer.echo(f"lightbert verify: {wd}")
    files = nbytes = changed = 0
    for result in results:
        check = result.check
        files, nbytes = files + check.files, nbytes + check.hashed_bytes
        status = "ok" if check.ok else f"CHANGED: {len(check.problems)} of {check.files} files"
        typer.echo(f"{result.name:<13} {status}  ({check.files} files, {size(check.hashed_bytes)})"
                   + (f"  {result.note}" if result.note else ""))
        for problem in check.problems:
            typer.echo(f"  {result.name}/{problem}")
        changed += len(check.problems)
    seconds = time.perf_counter() - t0
    bad = [r.name for r in results if not r.ok]
    typer.echo(f"checked {files} files, {size(nbytes)} in {seconds:.1f}s: "
               + (f"{changed} changed in {', '.join(bad)}" if bad else "every file matches its manifest"))
    raise typer.Exit(1 if bad else 0)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
