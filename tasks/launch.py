"""Several GPUs for a training stage: every rank of a torchrun launch runs this.

    torchrun --nproc_per_node N -m tasks.launch {teacher|distilbert|albert} --workdir W
             [--preset gpu] [--config FILE] [--set key=value ...]

The stage's upstream stages must be finished in W (`lightbert run --until <the stage before>`). Rank 0 runs
the stage's bookkeeping (tasks.stage.run_stage: cache key, .partial directory, manifest, move into place);
the other ranks run the same build function into the same .partial directory, where the training engine
(tasks/engine.py) makes them train under DDP and leaves every write to rank 0. The finished stage has the
cache key `lightbert run` computes, so a later `lightbert run` on W reuses it and goes on from there.
Without torchrun (one process) it is the stage as `lightbert run` would build it, minus Prefect and MLflow.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tasks import albert, distilbert, engine, teacher
from tasks.artifacts import sha256_json
from tasks.config import PipelineConfig, load_config
from tasks.stage import (
    PARTIAL,
    StageContext,
    StageRecord,
    StageSpec,
    cache_key_parts,
    check_stage,
    read_manifest,
    run_stage,
)

TRAINING_STAGES: dict[str, StageSpec] = {s.name: s for s in (teacher.STAGE, distilbert.STAGE, albert.STAGE)}


def _precision(cfg: PipelineConfig, stage: str) -> str:
    return {"teacher": cfg.teacher.train, "distilbert": cfg.distilbert.train, "albert": cfg.albert.train}[
        stage].precision


def finished_upstream(spec: StageSpec, workdir: Path) -> dict[str, StageRecord]:
    upstream = {}
    for name in spec.upstream:
        manifest = read_manifest(workdir / name)
        if manifest is None:
            raise SystemExit(f"{workdir / name} is not a finished stage; {spec.name} needs {', '.join(spec.upstream)}: "
                             f"run `lightbert run --until {name} --workdir {workdir}` (same configuration) first")
        upstream[name] = StageRecord(name, workdir / name, manifest, cached=True, reason="finished earlier")
    return upstream


def main(argv: list[str] | None = None, stage: str | None = None) -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="python -m tasks.launch", description=__doc__.splitlines()[0])
    if stage is None:
        parser.add_argument("stage", choices=list(TRAINING_STAGES))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    name = stage or args.stage
    spec = TRAINING_STAGES[name]
    cfg, _ = load_config(args.preset, args.config, args.overrides)
    if name == "distilbert" and cfg.distilbert.ablation_rows():
        raise SystemExit("distilbert.ablations runs in one process only: launch without them "
                         "(--set distilbert.ablations=false) or train them with `lightbert run`")
    workdir = args.workdir.resolve()
    upstream = finished_upstream(spec, workdir)
    rt = engine.setup_runtime(_precision(cfg, name))  # joins torchrun's process group
    parts = cache_key_parts(spec, cfg, upstream)
    done = [check_stage(workdir / name, parts)[0] if rt.is_main else False]
    if rt.distributed:
        dist.broadcast_object_list(done, src=0)
    if done[0]:
        if rt.is_main:
            print(f"{name}: {workdir / name} is up to date")
    elif rt.is_main:
        record = run_stage(spec, cfg, workdir, upstream)
        print(f"{name}: {record.dir} {record.manifest['counts']}")
    else:
        out_dir = workdir / PARTIAL / f"{name}-{sha256_json(parts)[:16]}"
        with tempfile.TemporaryDirectory() as scratch:
            spec.build(cfg, StageContext(name, out_dir, Path(scratch), upstream, cfg, resuming=True))
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
