"""Data-stage shards as Prefect tasks: with run.task_runner: dask the flow runs on prefect-dask's
DaskTaskRunner, and a stage's independent shards (tasks/pairs/shards.py) are submitted to it, one task
run each, so that they spread over the cluster's workers and show in the Prefect UI.

Every Dask worker must import lightbert (the same version) and see the workdir, the corpus stage's
output and the tokenizer at the same paths: shared storage (NFS, a cluster file system). The default,
run.task_runner: local, runs the shards in the stage's own worker processes instead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE

from tasks.config import PipelineConfig


# The shard writes its own output atomically and a rerun keeps a finished one (the stage's resume),
# so Prefect keeps no result of its own.
@task(name="shard", task_run_name="{stage}:{name}", cache_policy=NO_CACHE)
def run_shard_task(fn: Callable[[Any, Any], Any], job: Any, shared: Any, stage: str, name: str) -> Any:
    return fn(job, shared)


def prefect_shard_map(stage: str) -> Callable[[Callable, list, Any], list]:
    """A StageContext.shard_map that submits one Prefect task per shard to the flow's task runner."""

    def shard_map(fn: Callable[[Any, Any], Any], jobs: list, shared: Any) -> list:
        names = [getattr(job, "name", str(i)) for i, job in enumerate(jobs)]
        futures = run_shard_task.map(unmapped(fn), jobs, unmapped(shared), unmapped(stage), names)
        return [future.result() for future in futures]

    return shard_map


def task_runner(cfg: PipelineConfig):
    """The flow's task runner for this configuration: None keeps Prefect's default."""
    if cfg.run.task_runner != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if cfg.run.dask_address:
        return DaskTaskRunner(address=cfg.run.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.run.resolved_num_proc(), "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})
