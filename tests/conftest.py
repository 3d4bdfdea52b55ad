"""Shared fixtures: offline settings, a small configuration, and a stage runner in a temp workdir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline, quiet, and no stray state in the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.config import PipelineConfig, load_config  # noqa: E402


@pytest.fixture
def make_config():
    """make_config("pairs.max_seq_len=32", preset="smoke") -> a validated PipelineConfig."""

    def _make(*overrides: str, preset: str = "smoke") -> PipelineConfig:
        cfg, _ = load_config(preset, overrides=["run.progress=false", *overrides])
        return cfg

    return _make


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d
