"""A training stage on several GPUs: every rank of a torchrun launch runs `lightbert train STAGE`.

    torchrun --nproc_per_node N -m flows.cli train {teacher|distilbert|albert} --workdir W
             [--preset gpu] [--config FILE] [--set key=value ...]

The stage's upstream stages must be finished in W (`lightbert run --until <the stage before>`). Rank 0 runs
the stage's bookkeeping (tasks.stage.run_stage: cache key, .partial directory, manifest, move into place);
the other ranks run the same build function into the same .partial directory, where the training engine
(tasks/engine.py) makes them train under DDP and leaves every write to rank 0. The finished stage has the
cache key `lightbert run` computes, so a later `lightbert run` on W reuses it and goes on from there.
Without torchrun (one process) it is the stage as `lightbert run` would build it, minus Prefect and MLflow.
Rank 0 holds the workdir's lock for the launch, so a `lightbert run` on W waits its turn.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from tasks import engine
from tasks.artifacts import sha256_json
from tasks.config import ConfigError, load_config
from tasks.pipeline import SPECS, TRAINING_STAGES
from tasks.stage import (
    PARTIAL,
    StageContext,
    StageError,
    StageRecord,
    StageSpec,
    cache_key_parts,
    check_stage,
    read_manifest,
    run_stage,
    workdir_lock,
)

log = logging.getLogger(__name__)


def finished_upstream(spec: StageSpec, workdir: Path) -> dict[str, StageRecord]:
    upstream = {}
    for name in spec.upstream:
        manifest = read_manifest(workdir / name)
        if manifest is None:
            raise StageError(f"{workdir / name} is not a finished stage; {spec.name} needs {', '.join(spec.upstream)}: "
                             f"run `lightbert run --until {name} --workdir {workdir}` (same configuration) first")
        upstream[name] = StageRecord(name, workdir / name, manifest, cached=True, reason="finished earlier")
    return upstream


def train_stage(name: str, workdir: Path, preset: str | None = None, config: Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> str | None:
    """Build training stage `name` in `workdir` on every rank of a torchrun launch (or in this one
    process). Returns, on rank 0, a line saying what was done; None on the other ranks."""
    import torch.distributed as dist

    if name not in TRAINING_STAGES:
        raise ConfigError(f"{name!r} is not a training stage; `lightbert train` takes one of {', '.join(TRAINING_STAGES)}")
    spec = SPECS[name]
    cfg, _ = load_config(preset, config, list(overrides))
    if name == "distilbert" and cfg.distilbert.ablation_rows():
        raise ConfigError("distilbert.ablations runs in one process only: launch without them "
                          "(--set distilbert.ablations=false) or train them with `lightbert run`")
    workdir = Path(workdir).resolve()
    upstream = finished_upstream(spec, workdir)
    rt = engine.setup_runtime(spec.training_config(cfg).precision)  # joins torchrun's process group
    parts = cache_key_parts(spec, cfg, upstream)
    outcome = None
    with workdir_lock(workdir) if rt.is_main else contextlib.nullcontext():
        done = [check_stage(workdir / name, parts)[0] if rt.is_main else False]
        if rt.distributed:
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            outcome = f"{name}: {workdir / name} is up to date" if rt.is_main else None
        elif rt.is_main:
            record = run_stage(spec, cfg, workdir, upstream)
            outcome = f"{name}: {record.dir} {record.manifest['counts']}"
        else:
            out_dir = workdir / PARTIAL / f"{name}-{sha256_json(parts)[:16]}"
            with tempfile.TemporaryDirectory() as scratch:
                spec.build_fn()(cfg, StageContext(name, out_dir, Path(scratch), upstream, cfg, resuming=True))
        if rt.distributed:
            dist.barrier()
            dist.destroy_process_group()
    return outcome
