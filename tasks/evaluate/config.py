"""The evaluate stage's section: how every model is scored, and the downstream tasks (evaluate.downstream)."""

from __future__ import annotations

from pydantic import Field

from tasks.downstream.config import DownstreamConfig, check_names
from tasks.section import Section


class EvaluateConfig(Section):
    models: list[str] | None = Field(
        None, description="which of the models the pretraining stages save to evaluate (teacher, distilbert, "
        "albert-scratch, albert-distilled: tasks.pipeline.MODEL_NAMES); None = every model the run trained "
        "(the teacher is always scored: it is the reference of retention and speed-up)")
    max_eval_examples: int | None = Field(None, ge=1, description="validation pairs scored; None = all")
    batch_size: int = Field(64, ge=1, description="examples per batch for MLM/NSP/SOP scoring")
    latency_sentences: int = Field(200, ge=1, description="validation sentences in one timed pass at batch 1")
    latency_repeats: int = Field(5, ge=1, description="timed passes; the median is reported")
    latency_threads: int = Field(1, ge=1, description="torch CPU threads while timing (stated in the report)")
    throughput_batch_size: int = Field(32, ge=1, description="batch of the CPU throughput measure of every "
                                       "exported variant (the deployment table)")
    gpu_batch_size: int = Field(256, ge=1, description="batch of the GPU throughput measure (when a GPU is there)")
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    plots: bool = True


def evaluate_key(cfg) -> dict:
    return {"evaluate": cfg.section("evaluate"), "seed": cfg.run.seed}


def check_model_names(cfg) -> None:
    """evaluate.models and evaluate.downstream.distill.students name models the stages save."""
    check_names("evaluate.models", cfg.evaluate.models, cfg.model_names())
    check_names("evaluate.downstream.distill.students", cfg.evaluate.downstream.distill.students, cfg.student_names())
