"""`lightbert` command line: run the pipeline, show the resolved configuration, open the MLflow UI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from tasks.config import ALL_STAGES, PRESETS, ConfigError, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress BERT into DistilBERT and ALBERT students: a Prefect + MLflow pipeline.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file merged over the preset.")]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", help=f"{' | '.join(PRESETS)}; default: gpu when CUDA is available, else cpu.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override one key, e.g. --set pairs.max_seq_len=64 (repeatable).")]


def _quiet_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _default_workdir(preset: str) -> Path:
    return Path("workdir") / preset


@app.command()
def run(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    workdir: Annotated[Path | None, typer.Option(help="Where stage outputs and mlflow.db live; "
                                                      "default ./workdir/<preset>.")] = None,
    overrides: SetOpt = None,
    until: Annotated[str | None, typer.Option(help="Last stage to run: " + ", ".join(ALL_STAGES))] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; default "
                                                          "sqlite:///<workdir>/mlflow.db")] = None,
) -> None:
    """Run the pipeline; finished stages whose inputs did not change are reused."""
    _quiet_defaults()
    try:
        cfg, preset_name = load_config(preset, config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    from flows.stages import STAGES

    if until is not None and until not in STAGES:
        later = f" ('{until}' is not built yet)" if until in ALL_STAGES else ""
        _fail(f"--until {until}: unknown stage{later}; choose one of: {', '.join(STAGES)}")
    wd = (workdir or _default_workdir(preset_name)).resolve()

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
    typer.echo("\nstage      output")
    for stage, out in outputs.items():
        manifest = read_manifest(Path(out)) or {}
        typer.echo(f"{stage:<10} {out}  ({manifest.get('timings', {}).get('seconds', 0):.1f}s)")
    uri = tracking_uri or default_tracking_uri(wd)
    typer.echo(f"\nMLflow: {uri}\n  browse with: lightbert ui --workdir {wd}")


@app.command("config")
def show_config(config: ConfigOpt = None, preset: PresetOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved configuration (preset + file + --set), after validation."""
    try:
        cfg, preset_name = load_config(preset, config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"# preset: {preset_name}\n{dump_config(cfg)}", nl=False)


@app.command()
def ui(
    workdir: Annotated[Path, typer.Option(help="The workdir whose mlflow.db to browse.")] = Path("workdir/cpu"),
    port: int = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for a workdir's store (one worker: light on a laptop)."""
    wd = workdir.resolve()
    db = wd / "mlflow.db"
    if not db.is_file():
        _fail(f"{db} does not exist; run `lightbert run --workdir {workdir}` first or pass --workdir")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", (wd / "mlruns").as_uri(),
           "--workers", "1"]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd, env=env))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
