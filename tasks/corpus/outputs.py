"""Reading the corpus stage's output: one Arrow dataset per split (train, validation) of cleaned,
sentence-split documents."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, load_from_disk


def load_split(corpus_dir: Path, split: str) -> Dataset | None:
    """A corpus split, or None when it is missing or empty. datasets 5.2 saves an empty dataset with no
    data file and then cannot load it back (IndexError), so emptiness is read from its state.json."""
    path = Path(corpus_dir) / split
    state = path / "state.json"
    if not state.is_file() or not json.loads(state.read_text(encoding="utf-8")).get("_data_files"):
        return None
    ds = load_from_disk(str(path))
    return ds if len(ds) else None
