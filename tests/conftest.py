"""Shared fixtures: offline settings, a small configuration, and a stage runner in a temp workdir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Offline, quiet, and no stray state in the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests mirror the tree in folders, and a few import another folder's builders (test_distilbert uses
# test_cache's rows): every folder is importable, as the top one is.
sys.path[1:1] = [str(d) for d in sorted(Path(__file__).parent.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]

from tasks.config import PipelineConfig, load_config  # noqa: E402
from tasks.pipeline import SPECS, stages_until  # noqa: E402


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


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A real (temporary, local) Prefect server for the flow tests, with its own PREFECT_HOME. Yields its API
    URL, for a `lightbert` subprocess to use as a user's server (PREFECT_API_URL)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


WORDS = (
    "river mountain city council market player season album film company government school "
    "music energy water science history island bridge engine garden station village winter "
    "summer doctor teacher writer painter soldier farmer student museum library church castle "
    "forest ocean desert valley harbour railway airport factory hospital theatre stadium"
).split()
VERBS = "built opened won lost found wrote painted crossed visited joined left studied".split()


def write_text_corpus(folder: Path, documents: int = 60, seed: int = 0) -> Path:
    """Documents of varied pseudo-English sentences, one .txt file each (the tests' own text)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        sentences = []
        for _ in range(rng.randint(4, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            words.insert(rng.randint(1, len(words)), rng.choice(VERBS))
            sentences.append(f"The {' '.join(words)} in {1800 + rng.randint(0, 220)}.")
        (folder / f"doc{d:04d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    return write_text_corpus(tmp_path / "corpus-src")


@pytest.fixture(scope="session")
def smoke_stages(tmp_path_factory) -> dict:
    """The smoke preset's stages through the teacher cache, on the embedded corpora, built once per
    test session (about half a minute on 2 cores; the corpora come from the package registry once)."""
    from tasks.stage import run_stage

    cfg, _ = load_config("smoke", overrides=["run.progress=false"])
    workdir = tmp_path_factory.mktemp("smoke-stages")
    records: dict = {}
    for spec in (SPECS[name] for name in stages_until("cache")):
        records[spec.name] = run_stage(spec, cfg, workdir, {u: records[u] for u in spec.upstream})
    return {"config": cfg, "workdir": workdir, "records": records}


@pytest.fixture
def one_torch_thread():
    """Tiny models train as fast on one thread, and a second thread's OpenMP spin-waits make them
    ten times slower when another process shares the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """tests/helpers.py's tiny models and their finished export stage, built once per session (about 15 s)."""
    from helpers import tiny_export_workdir

    return tiny_export_workdir(tmp_path_factory.mktemp("tiny-export"))
