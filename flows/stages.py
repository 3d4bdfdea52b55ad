"""The stages the pipeline knows, in order, and the one Prefect task that runs any of them tracked."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows import tracking
from flows.shards import prefect_shard_map
from tasks.config import PipelineConfig
from tasks.pipeline import SPECS, STAGES, stages_until  # noqa: F401  (the flow and the CLI import them here)
from tasks.stage import StageRecord, run_stage


def summary_line(record: StageRecord) -> str:
    counts = record.manifest.get("counts", {})
    shown = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v:.4g}"
                      for k, v in list(counts.items())[:4] if isinstance(v, int | float))
    seconds = record.manifest.get("timings", {}).get("seconds", 0.0)
    if record.cached:
        return f"{record.name:<13} cached   (built earlier in {seconds:.1f}s) {shown}"
    return f"{record.name:<13} built in {seconds:.1f}s ({record.reason}) {shown}"


def stage_warnings(record: StageRecord) -> list[str]:
    """What a stage found worth a warning (files skipped, documents dropped, [UNK] rate...): its manifest's
    details.warnings; the run summary repeats them."""
    return list(record.manifest.get("details", {}).get("warnings", []))


# Caching is the stage's own (tasks/stage.py): Prefect's result cache cannot tell whether the files
# a task wrote still exist and match, so every call re-checks the manifest against the files.
@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_tracked_stage(stage: str, cfg: PipelineConfig, workdir: Path, upstream: dict[str, StageRecord],
                      parent_run_id: str):
    spec = SPECS[stage]
    with tracking.stage_run(stage, parent_run_id) as run_id:
        record = run_stage(spec, cfg, workdir, upstream, producer={"mlflow_run_id": run_id},
                           metrics_sink=tracking.log_metrics,
                           shard_map=prefect_shard_map(stage) if cfg.run.task_runner == "dask" else None)
        tracking.log_stage(record, {name: upstream[name] for name in spec.upstream})
        tracking.register_models(record)
        tracking.log_ablations(record, run_id)
        for outcome in tracking.record_evaluations(record):
            get_run_logger().info(f"registry: {outcome['name']} v{outcome['version']}: {outcome['reason']}")
    get_run_logger().info(summary_line(record))
    for warning in stage_warnings(record):
        get_run_logger().warning(warning)
    if record.cached:
        return Completed(data=record, name="Cached", message=f"reused {record.dir}")
    return record
