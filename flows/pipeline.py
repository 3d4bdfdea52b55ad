"""The Prefect flow: stage after stage, each tracked in MLflow under one parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import tracking
from flows.shards import task_runner
from flows.stages import SPECS, run_tracked_stage, stages_until
from tasks.config import PipelineConfig, save_resolved_config, validate_config
from tasks.pipeline import preflight
from tasks.stage import StageRecord, workdir_lock


@flow(name="lightbert-pipeline")
def lightbert_pipeline(config: dict[str, Any], workdir: str, until: str | None = None,
                       tracking_uri: str | None = None, preset: str = "custom") -> dict[str, str]:
    """Run (or reuse) every stage up to `until`; returns {stage: output directory}."""
    cfg = validate_config(config)
    preflight(cfg, until)
    wd = Path(workdir).resolve()
    with workdir_lock(wd), tracking.pipeline_run(cfg, wd, preset, until, tracking_uri) as parent_run_id:
        # Holding the lock, this is the only live run of the workdir: what an earlier run of it left
        # RUNNING in MLflow was killed (kill -9...) and is closed now, before any stage runs.
        closed = tracking.close_abandoned_runs(wd, parent_run_id)
        if closed:
            get_run_logger().info(f"marked KILLED {len(closed)} MLflow run(s) a killed run of {wd} left RUNNING: "
                                  f"{', '.join(closed)}")
        save_resolved_config(cfg, wd)
        runner = task_runner(cfg)
        if runner is None:
            records = run_stages(cfg, wd, until, parent_run_id)
        else:  # a subflow on the Dask task runner, where the stages submit their shards
            records = stages_on_dask.with_options(task_runner=runner)(cfg, wd, until, parent_run_id)
    return {name: str(record.dir) for name, record in records.items()}


def run_stages(cfg: PipelineConfig, wd: Path, until: str | None, parent_run_id: str) -> dict[str, StageRecord]:
    records: dict[str, StageRecord] = {}
    for stage in stages_until(until):
        upstream = {name: records[name] for name in SPECS[stage].upstream}
        # return_state: a reused stage ends in a "Cached" state, which a plain call would hand back as is.
        state = run_tracked_stage(stage, cfg, wd, upstream, parent_run_id, return_state=True)
        records[stage] = state.result()
    return records


stages_on_dask = flow(name="lightbert-stages", validate_parameters=False)(run_stages)
