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
    for stage, out in outputs.items():
        manifest = read_manifest(Path(out)) or {}
        typer.echo(f"{stage:<13} {out}  ({manifest.get('timings', {}).get('seconds', 0):.1f}s)")
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
) -> None:
    """Start the MLflow UI on 127.0.0.1 for a workdir's store (one worker: light on a laptop)."""
    from flows.serve import check_port_free, mlflow_server_command, server_env

    wd = _store_workdir(workdir)
    db = wd / "mlflow.db"
    if not db.is_file():
        _fail(f"{db} does not exist; run `lightbert run --workdir {wd}` first or pass --workdir")
    try:
        check_port_free(port, "--port")
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"MLflow UI for {db} on http://127.0.0.1:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(mlflow_server_command(wd, port), env=server_env()))


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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
