"""The pairs stage's output on disk, and its reader.

Layout of a split's directory (train/, validation/):

    split.json          format and version, the special token ids, and the shards in order
    shard-00000/        the examples of one chunk of documents (every copy of it for train), one .npy
    shard-00001/        file per array below, written to a temporary directory and renamed into place

A shard holds n examples. Each example stores its segments once, without special tokens, as the
model's inputs (masked tokens already replaced): A, then B' (what the NSP view shows after A), then B
again only when B' came from another document. Masked-LM labels are sparse: the positions in that run
and the original tokens there.

    tokens               uint16 (or int32 for a vocabulary of 65,536 or more)  every example's run
    offsets              int64 (n + 1,)     example j's run is tokens[offsets[j]:offsets[j + 1]]
    lengths              uint16 (n, 3)      lengths of A, B' and the stored B (0 when B' is B)
    label_offsets        int64 (n + 1,)     example j's labels are rows label_offsets[j]:label_offsets[j + 1]
    label_positions      uint16             positions in the example's run, ascending
    label_ids            uint16 (or int32)  the original token at each
    next_sentence_label  int8               0: B' is B, A's true continuation; 1: B' from another document
    sentence_order_label int8               0: SOP view in the original order; 1: swapped
    doc_index            int64              A's document (its row in the corpus split)
    nsp_b_doc_index      int64              B''s document (= doc_index when next_sentence_label is 0)

Every offset is int64: no 2^31 limit. The two views are derived when a row is read:

    NSP view  input_ids [CLS] A [SEP] B' [SEP], token_type_ids 0 up to the first [SEP] and 1 after,
              labels the original id at labelled positions and -100 elsewhere, next_sentence_label
    SOP view  sop_input_ids [CLS] A [SEP] B [SEP], or [CLS] B [SEP] A [SEP] when swapped; sop_token_type_ids,
              sop_labels as above (A and B keep their masking in both views), sentence_order_label
    both      attention_mask / sop_attention_mask (all 1), length / sop_length

Bytes per token (of the NSP view), about: 2 for the run's tokens, 1 more for B when it is stored again
(half the pairs, half the tokens each), 4 x 15% for the labels, and 30 bytes per example: about 3.5 at
128-token pairs, against 20 for the dense datasets columns of both views of format 1.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import atomic_write_text
from tasks.stage import StageError

FORMAT = "lightbert-pairs"
FORMAT_VERSION = 2
SPLIT_FILE = "split.json"
IGNORE_INDEX = -100
# Each view's columns: input ids, token types, attention mask, masked-LM labels, pair label; and its length.
VIEW_COLUMNS = {
    "nsp": ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"),
    "sop": ("sop_input_ids", "sop_token_type_ids", "sop_attention_mask", "sop_labels", "sentence_order_label"),
}
LENGTH_COLUMN = {"nsp": "length", "sop": "sop_length"}
SCALAR_COLUMNS = ("next_sentence_label", "sentence_order_label", "doc_index", "nsp_b_doc_index")
COLUMNS = (*VIEW_COLUMNS["nsp"], *VIEW_COLUMNS["sop"], "doc_index", "nsp_b_doc_index", "length", "sop_length")
ARRAYS = ("tokens", "offsets", "lengths", "label_offsets", "label_positions", "label_ids", *SCALAR_COLUMNS)


def view_columns(view: str) -> list[str]:
    """Every column of one view, its length last."""
    return [*VIEW_COLUMNS[view], LENGTH_COLUMN[view]]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def write_shard(folder: Path, arrays: dict[str, np.ndarray], extra: dict[str, str] | None = None) -> None:
    """Write one shard's arrays (ARRAYS), and `extra` text files, atomically: into a temporary sibling,
    then renamed; a shard folder under its name is always complete."""
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"a pairs shard needs arrays {sorted(missing)}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]))
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def write_split_file(split_dir: Path, shards: Sequence[dict[str, Any]], specials: dict[str, int]) -> None:
    info = {"format": FORMAT, "version": FORMAT_VERSION, **specials, "shards": list(shards)}
    atomic_write_text(split_dir / SPLIT_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _open_shard(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}


class PairsSplit:
    """One split of the pairs output, read through memory maps: len(ds); ds[i] -> a row dict (int64
    arrays); ds[indices] -> columns (lists of arrays), as datasets.Dataset returns them; ds["length"] (any
    scalar column) -> a numpy array. Views of it keep some columns (select_columns), rename them (rename_columns) or keep the
    first rows (head), without copying."""

    def __init__(self, folder: Path, info: dict[str, Any], columns: Sequence[str] = COLUMNS,
                 names: dict[str, str] | None = None, limit: int | None = None):
        self.folder, self.info = Path(folder), info
        self._columns = tuple(columns)
        self._names = dict(names or {})  # stored column -> the name shown
        self.cls_id, self.sep_id = int(info["cls_token_id"]), int(info["sep_token_id"])
        counts = [int(s["examples"]) for s in info["shards"]]
        self.shard_first_rows = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.shard_first_rows[-1])
        self._len = total if limit is None else min(limit, total)
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    # -- views --------------------------------------------------------------------------------------
    def _view(self, **changes) -> PairsSplit:
        args = {"columns": self._columns, "names": self._names, "limit": self._len}
        args.update(changes)
        return PairsSplit(self.folder, self.info, **args)

    @property
    def column_names(self) -> list[str]:
        return [self._names.get(c, c) for c in self._columns]

    def select_columns(self, columns: Sequence[str]) -> PairsSplit:
        shown = {self._names.get(c, c): c for c in self._columns}
        missing = [c for c in columns if c not in shown]
        if missing:
            raise KeyError(f"no column(s) {missing} in {self.folder} (it has {list(shown)})")
        return self._view(columns=[shown[c] for c in columns])

    def rename_columns(self, mapping: dict[str, str]) -> PairsSplit:
        names = {c: mapping.get(self._names.get(c, c), self._names.get(c, c)) for c in self._columns}
        return self._view(names=names)

    def head(self, n: int) -> PairsSplit:
        return self._view(limit=min(n, self._len))

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_shards": {}}

    # -- rows ---------------------------------------------------------------------------------------
    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._shards:
            self._shards[s] = _open_shard(self.folder / self.info["shards"][s]["dir"])
        return self._shards[s]

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} is outside {self.folder} ({self._len} examples)")
        s = int(np.searchsorted(self.shard_first_rows, i, side="right") - 1)
        return self._shard(s), i - int(self.shard_first_rows[s])

    def _row(self, i: int) -> dict[str, Any]:
        a, j = self._locate(i)
        o = int(a["offsets"][j])
        la, lbp, lb_stored = (int(x) for x in a["lengths"][j])
        run = np.asarray(a["tokens"][o:o + la + lbp + lb_stored], dtype=np.int64)
        l0, l1 = int(a["label_offsets"][j]), int(a["label_offsets"][j + 1])
        lpos = np.asarray(a["label_positions"][l0:l1], dtype=np.int64)
        lids = np.asarray(a["label_ids"][l0:l1], dtype=np.int64)
        nsp, swapped = int(a["next_sentence_label"][j]), int(a["sentence_order_label"][j])
        row: dict[str, Any] = {"next_sentence_label": nsp, "sentence_order_label": swapped,
                               "doc_index": int(a["doc_index"][j]), "nsp_b_doc_index": int(a["nsp_b_doc_index"][j]),
                               "length": la + lbp + 3}
        want = set(self._columns)
        if want & {"input_ids", "token_type_ids", "attention_mask", "labels"}:
            in_nsp = lpos < la + lbp
            row["input_ids"] = self._layout(run[:la], run[la:la + lbp])
            row["token_type_ids"] = _type_ids(la, lbp)
            row["attention_mask"] = np.ones(la + lbp + 3, dtype=np.int64)
            row["labels"] = _labels(la + lbp + 3, 1 + lpos[in_nsp] + (lpos[in_nsp] >= la), lids[in_nsp])
        b_at, lb = (la + lbp, lb_stored) if nsp else (la, lbp)
        row["sop_length"] = la + lb + 3
        if want & {"sop_input_ids", "sop_token_type_ids", "sop_attention_mask", "sop_labels"}:
            seg_a, seg_b = run[:la], run[b_at:b_at + lb]
            is_a, is_b = lpos < la, (lpos >= b_at) & (lpos < b_at + lb)
            pa, pb = lpos[is_a], lpos[is_b] - b_at
            if swapped:
                ids, first = self._layout(seg_b, seg_a), lb
                where = np.concatenate([lb + 2 + pa, 1 + pb])
            else:
                ids, first = self._layout(seg_a, seg_b), la
                where = np.concatenate([1 + pa, la + 2 + pb])
            row["sop_input_ids"] = ids
            row["sop_token_type_ids"] = _type_ids(first, la + lb - first)
            row["sop_attention_mask"] = np.ones(la + lb + 3, dtype=np.int64)
            row["sop_labels"] = _labels(la + lb + 3, where, np.concatenate([lids[is_a], lids[is_b]]))
        return {self._names.get(c, c): row[c] for c in self._columns}

    def _layout(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        out = np.empty(len(first) + len(second) + 3, dtype=np.int64)
        out[0], out[len(first) + 1], out[-1] = self.cls_id, self.sep_id, self.sep_id
        out[1:len(first) + 1] = first
        out[len(first) + 2:-1] = second
        return out

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.column(key)
        if isinstance(key, int | np.integer):
            return self._row(int(key))
        if isinstance(key, slice):
            key = range(*key.indices(len(self)))
        rows = [self._row(int(i)) for i in key]
        return {name: [r[name] for r in rows] for name in self.column_names}

    def _shard_rows(self):
        """(a shard's arrays, how many of its first rows this view holds), shard by shard."""
        for s in range(len(self.info["shards"])):
            lo = int(self.shard_first_rows[s])
            if lo >= self._len:
                return
            a = self._shard(s)
            yield a, min(self._len - lo, len(a["offsets"]) - 1)

    def column(self, name: str) -> np.ndarray | list:
        """A whole column: scalar ones (lengths, labels, documents) as one array read shard by shard; a
        sequence column as a list of arrays (every row built: for small splits)."""
        stored = {self._names.get(c, c): c for c in self._columns}.get(name)
        if stored is None:
            raise KeyError(f"no column {name!r} in {self.folder} (it has {self.column_names})")
        if stored in SCALAR_COLUMNS or stored in ("length", "sop_length"):
            parts = []
            for a, take in self._shard_rows():
                if stored in SCALAR_COLUMNS:
                    parts.append(np.asarray(a[stored][:take], dtype=np.int64))
                else:
                    lengths = np.asarray(a["lengths"][:take], dtype=np.int64)
                    b = np.where(np.asarray(a["next_sentence_label"][:take]) == 1, lengths[:, 2], lengths[:, 1])
                    parts.append(lengths[:, 0] + (lengths[:, 1] if stored == "length" else b) + 3)
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return [self._row(i)[name] for i in range(self._len)]

    def label_counts(self, view: str = "nsp") -> np.ndarray:
        """How often each token id is a masked-LM label in `view`, read shard by shard (memory: one shard's
        labels)."""
        total = np.zeros(0, dtype=np.int64)
        for a, take in self._shard_rows():
            end = int(a["label_offsets"][take])
            pos = np.asarray(a["label_positions"][:end], dtype=np.int64)
            ids = np.asarray(a["label_ids"][:end], dtype=np.int64)
            ex = np.repeat(np.arange(take), np.diff(np.asarray(a["label_offsets"][:take + 1], dtype=np.int64)))
            lengths = np.asarray(a["lengths"][:take], dtype=np.int64)[ex]
            rnd = np.asarray(a["next_sentence_label"][:take])[ex] == 1
            keep = pos < lengths[:, 0] + lengths[:, 1] if view == "nsp" else \
                (pos < lengths[:, 0]) | ~rnd | (pos >= lengths[:, 0] + lengths[:, 1])
            total = _add_counts(total, np.bincount(ids[keep]))
        return total

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs, unmasked (the labels put back), in the NSP view's A and B' segments
        (special tokens not counted), read shard by shard (memory: one shard's tokens)."""
        total = np.zeros(0, dtype=np.int64)
        for a, take in self._shard_rows():
            offsets = np.asarray(a["offsets"][:take + 1], dtype=np.int64)
            tokens = np.asarray(a["tokens"][:offsets[-1]], dtype=np.int64)
            ex_of_label = np.repeat(np.arange(take), np.diff(np.asarray(a["label_offsets"][:take + 1], dtype=np.int64)))
            end = int(a["label_offsets"][take])
            tokens[offsets[ex_of_label] + np.asarray(a["label_positions"][:end], dtype=np.int64)] = \
                np.asarray(a["label_ids"][:end], dtype=np.int64)
            lengths = np.asarray(a["lengths"][:take], dtype=np.int64)
            run = np.repeat(np.arange(take), np.diff(offsets))
            in_nsp = np.arange(len(tokens)) - offsets[run] < (lengths[:, 0] + lengths[:, 1])[run]
            total = _add_counts(total, np.bincount(tokens[in_nsp]))
        return total


def _add_counts(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Two bincounts of different lengths, summed."""
    if len(counts) > len(total):
        counts[:len(total)] += total
        return counts
    total[:len(counts)] += counts
    return total


def _type_ids(len_first: int, len_second: int) -> np.ndarray:
    return np.repeat(np.array([0, 1], dtype=np.int64), [len_first + 2, len_second + 1])


def _labels(length: int, where: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.full(length, IGNORE_INDEX, dtype=np.int64)
    out[where] = ids
    return out


def load_split(pairs_dir: Path, split: str, views: Sequence[str] = (), columns: Sequence[str] | None = None,
               max_examples: int | None = None) -> PairsSplit:
    """One split of a pairs stage output. `views`: checked to be known; `columns`: keep only these;
    `max_examples`: the first rows (the same for every model that is scored on them)."""
    path = Path(pairs_dir) / split
    info_path = path / SPLIT_FILE
    if not info_path.is_file():
        if (path / "state.json").is_file():
            raise StageError(f"{path} was written by an older lightbert (pairs format 1, a datasets folder); "
                             "rerun the pairs stage (lightbert run rebuilds it)")
        raise StageError(f"{path} is missing: the pairs stage output is incomplete; rerun the pairs stage")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise StageError(f"{info_path} is not {FORMAT} version {FORMAT_VERSION}; rerun the pairs stage")
    unknown = [v for v in views if v not in VIEW_COLUMNS]
    if unknown:
        raise StageError(f"unknown view(s) {unknown}: the pairs output has {list(VIEW_COLUMNS)}")
    ds = PairsSplit(path, info)
    if max_examples is not None and max_examples < len(ds):
        ds = ds.head(max_examples)
    return ds.select_columns(list(columns)) if columns is not None else ds
