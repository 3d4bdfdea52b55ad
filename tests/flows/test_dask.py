"""run.task_runner: dask: the data stages under a real local Dask cluster of two worker processes (prefect-
dask's DaskTaskRunner), against the default local run."""

from __future__ import annotations

import pytest
from helpers import tiny_overrides

from tasks.config import load_config
from tasks.stage import read_manifest

DATA_STAGES = ("corpus", "tokenizer", "pairs")


@pytest.mark.slow
def test_data_stages_on_a_dask_cluster_write_what_a_local_run_writes(prefect_harness, text_corpus, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import lightbert_pipeline

    overrides = [*tiny_overrides(text_corpus), "corpus.shard_documents=8", "pairs.chunk_documents=4", "run.num_proc=2"]
    fingerprints = {}
    for runner in ("local", "dask"):
        cfg, _ = load_config("smoke", overrides=[*overrides, f"run.task_runner={runner}"])
        workdir = tmp_path / runner
        out = lightbert_pipeline(cfg.model_dump(mode="json"), str(workdir), until="pairs", preset="smoke")
        assert tuple(out) == DATA_STAGES
        fingerprints[runner] = {s: read_manifest(workdir / s)["output_fingerprint"] for s in DATA_STAGES}
    assert fingerprints["dask"] == fingerprints["local"]  # byte-identical outputs
    counts = read_manifest(tmp_path / "dask" / "pairs")["counts"]
    assert counts["shards_train"] >= 2  # the cluster had work for both workers
    cleaning_shards = read_manifest(tmp_path / "dask" / "corpus")["counts"]["shards"]
    assert cleaning_shards >= 2

    async def shard_runs():
        async with get_client() as client:
            runs = await client.read_task_runs()
        return [r.name for r in runs if r.state.is_completed()]

    import asyncio

    names = asyncio.run(shard_runs())
    # one Prefect task run per shard (the local run made none: its shards ran in worker processes)
    assert sorted(n for n in names if n.startswith("pairs:")) == sorted(
        f"pairs:{split}/shard-{i:05d}" for split in ("train", "validation") for i in range(counts[f"shards_{split}"]))
    assert sorted(n for n in names if n.startswith("corpus:")) == [
        f"corpus:clean/shard-{i:05d}" for i in range(cleaning_shards)]
