"""Reading the pairs stage's output: one Arrow dataset per split (train, validation), each example in two
views, BERT's NSP pair and ALBERT's SOP pair, with their masked-LM labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, load_from_disk

from tasks.stage import StageError

# Each view's columns: input ids, token types, attention mask, masked-LM labels, pair label; and its length.
VIEW_COLUMNS = {
    "nsp": ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"),
    "sop": ("sop_input_ids", "sop_token_type_ids", "sop_attention_mask", "sop_labels", "sentence_order_label"),
}
LENGTH_COLUMN = {"nsp": "length", "sop": "sop_length"}


def view_columns(view: str) -> list[str]:
    """Every column of one view, its length last."""
    return [*VIEW_COLUMNS[view], LENGTH_COLUMN[view]]


def load_split(pairs_dir: Path, split: str, views: Sequence[str] = (), columns: Sequence[str] | None = None,
               max_examples: int | None = None) -> Dataset:
    """One split of a pairs stage output. `views`: check that their columns are there (an output of an
    older version may lack the SOP view); `columns`: keep only these; `max_examples`: the first rows (the
    same for every model that is scored on them)."""
    path = Path(pairs_dir) / split
    if not path.is_dir():
        raise StageError(f"{path} is missing: the pairs stage output is incomplete; rerun the pairs stage")
    ds = load_from_disk(str(path))
    missing = [c for v in views for c in view_columns(v) if c not in ds.column_names]
    if missing:
        raise StageError(f"{path} has no column(s) {missing}: it is not a pairs stage output of this version")
    if max_examples is not None and max_examples < len(ds):
        ds = ds.select(range(max_examples))
    return ds.select_columns(list(columns)) if columns is not None else ds
