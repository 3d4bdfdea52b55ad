"""What every configuration section is made of, and the sections no single stage owns: `run` (settings
every stage shares) and `TrainingConfig` (how tasks/engine.py trains a model, used by each training
stage's `train:` key). A stage's own section lives beside it, in tasks/<stage>/config.py; tasks/config.py
puts them together and loads them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the configuration."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    seed: int = 42
    experiment: str = "lightbert"
    num_proc: int = Field(0, ge=0, description="worker processes for data preparation; 0 = all cores (max 8)")
    task_runner: Literal["local", "dask"] = Field(
        "local", description="where the data stages' shards run: local worker processes, or Prefect tasks on "
        "a Dask cluster (prefect-dask); the workdir must then be on storage every Dask worker sees at the same path")
    dask_address: str | None = Field(
        None, description="scheduler of an existing Dask cluster (tcp://host:8786); None = start a local "
        "cluster of num_proc worker processes for the run")
    cache_dir: str | None = Field(
        None, description="download cache for sources; default $LIGHTBERT_CACHE or ~/.cache/lightbert"
    )
    progress: bool = True

    def resolved_num_proc(self) -> int:
        return self.num_proc or max(1, min(os.cpu_count() or 1, 8))

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("LIGHTBERT_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "lightbert"


class TrainingConfig(Section):
    """How a model is trained by tasks/engine.py (the teacher now, the students later)."""

    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="examples per forward pass on one device")
    effective_batch_size: int = Field(
        32, ge=1, description="examples per optimizer step over all devices; a multiple of batch_size "
        "(the rest is gradient accumulation)")
    learning_rate: float = Field(1e-4, gt=0.0, description="peak, after linear warmup; then linear decay to 0")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW; not on biases and LayerNorm")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; None = off")
    eval_every: int = Field(0, ge=0, description="steps between validation runs; 0 = only at the end")
    checkpoint_every: int = Field(100, ge=0, description="steps between resumable checkpoints; 0 = none")
    log_every: int = Field(10, ge=1, description="steps between logged training metrics")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU, fp32 on a CPU")
    num_workers: int | None = Field(None, ge=0, description="DataLoader worker processes that read and collate "
                                    "batches ahead of the loop (pinned memory on a GPU); None = 2 on a GPU, 0 on a "
                                    "CPU (collated in the loop: the cores are busy training)")
    prefetch_factor: int = Field(4, ge=1, description="batches each worker keeps ready")

    @model_validator(mode="after")
    def _whole_accumulation(self) -> TrainingConfig:
        if self.effective_batch_size % self.batch_size:
            raise ValueError(
                f"effective_batch_size ({self.effective_batch_size}) must be a multiple of batch_size "
                f"({self.batch_size}); e.g. effective_batch_size: {self.batch_size * 2}"
            )
        return self
