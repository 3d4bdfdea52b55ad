"""The teacher cache on disk: shard layout, size arithmetic, and the loader the students train from.

Layout of the cache stage's directory:

    cache_manifest.json                        what is where (below), the settings, fingerprints, totals
    <split>/<view>/shard-00000.safetensors     examples [0, E) of the pairs split, E = cache.examples_per_shard
    <split>/<view>/shard-00001.safetensors     examples [E, 2E) ...

A shard is one safetensors file (never pickle). Per-example data is ragged, so it is stored flat with
offsets; for the shard's n examples, m stored positions and t real tokens:

    example_index  int64   (n,)     row of the example in the pairs split (consecutive)
    pos_offsets    int64   (n+1,)   example j's positions are rows pos_offsets[j]:pos_offsets[j+1] below
    positions      int32   (m,)     position in the sequence (ascending per example)
    topk_ids       int32   (m, k)   the teacher's k likeliest tokens at that position, most likely first
    topk_probs     float32 (m, k)   their probabilities under the FULL-vocabulary softmax at temperature 1
    topk_mass      float32 (m,)     sum of topk_probs: the share of the distribution the k ids cover
    tok_offsets    int64   (n+1,)   example j's tokens are rows tok_offsets[j]:tok_offsets[j+1] below
    hidden_<l>     float16 (t, H)   hidden state of teacher layer l (0 = embeddings, L = last) at every
                                    real token, in sequence order (one tensor per cached layer)

Positions are the masked (labelled, labels != -100) ones, or every real token with cache.positions=all.
The view is `nsp` (input_ids, the sequence BERT and DistilBERT see) or `sop` (sop_input_ids, ALBERT's).

Soft labels and temperature. The stored probabilities are p_i = softmax(z)_i at temperature 1. A
distillation loss at temperature T softens them over the stored support:
    p_T,i = p_i^(1/T) / sum_{j in top-k} p_j^(1/T)
which is exactly softmax(z / T) restricted to the k ids and renormalised (p_i^(1/T) is proportional to
exp(z_i / T); the full softmax's normaliser cancels). With k = vocabulary size it is the exact full
distribution. `soft_targets` computes it; `topk_mass` says how much of the T=1 distribution is kept.

The loader (`CachedPairs` + `CachedPairsCollator`) joins the pairs examples with their cached tensors.
It opens a shard only when an example of it is asked for, reads only that example's rows (safetensors
slices of a memory map), and keeps at most `max_open_shards` shards open; the cache is never loaded
whole. It has the two things the training engine asks of a dataset (`ds["length"]` and `ds[indices]`
returning columns), so `engine.train(model, loss_fn, CachedPairs(...), cfg, CachedPairsCollator(...))`
batches it like the plain pairs.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from models.bert import IGNORE_INDEX
from tasks.artifacts import atomic_output_file, sha256_file
from tasks.engine import PadCollator
from tasks.pairs.outputs import LENGTH_COLUMN, VIEW_COLUMNS

FORMAT = "lightbert-teacher-cache"
FORMAT_VERSION = 1
CACHE_MANIFEST = "cache_manifest.json"
# Bytes of one stored item, by part (the estimate before writing and the manifest's dtypes agree).
DTYPES = {"example_index": "int64", "pos_offsets": "int64", "positions": "int32", "topk_ids": "int32",
          "topk_probs": "float32", "topk_mass": "float32", "tok_offsets": "int64", "hidden": "float16"}
HEADER_BYTES_PER_TENSOR = 72  # one safetensors JSON header entry, about; plus the metadata below
HEADER_BYTES_FIXED = 160


def hidden_name(layer: int) -> str:
    return f"hidden_{layer}"


def shard_relpath(split: str, view: str, index: int) -> str:
    return f"{split}/{view}/shard-{index:05d}.safetensors"


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
def bytes_per_position(top_k: int) -> int:
    """topk_ids + topk_probs + positions + topk_mass."""
    return top_k * (4 + 4) + 4 + 4


def bytes_per_token(hidden_size: int, n_layers: int) -> int:
    return hidden_size * 2 * n_layers


def shard_overhead_bytes(n_layers: int) -> int:
    return HEADER_BYTES_FIXED + HEADER_BYTES_PER_TENSOR * (7 + n_layers) + 2 * 8  # + the two offsets' n+1


# ------------------------------------------------------------------------------------------------
# writing and reading one shard
# ------------------------------------------------------------------------------------------------
@dataclass
class ExampleOutputs:
    """The teacher's outputs for one example, before packing."""

    positions: np.ndarray  # (p,) int32
    topk_ids: np.ndarray  # (p, k) int32
    topk_probs: np.ndarray  # (p, k) float32
    topk_mass: np.ndarray  # (p,) float32
    hidden: dict[int, np.ndarray]  # layer -> (t, H) float16


def pack_shard(first_example: int, examples: Sequence[ExampleOutputs], layers: Sequence[int]) -> dict[str, np.ndarray]:
    """Flatten a shard's examples (in example order) into the tensors listed in the module docstring."""
    n = len(examples)
    pos_counts = np.array([len(e.positions) for e in examples], dtype=np.int64)
    tok_counts = np.array([len(e.hidden[layers[0]]) for e in examples], dtype=np.int64)
    k = examples[0].topk_ids.shape[1] if n else 0
    h = examples[0].hidden[layers[0]].shape[1] if n else 0

    def cat(arrays: list[np.ndarray], dtype, tail: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(arrays).astype(dtype, copy=False)) if arrays \
            else np.zeros((0, *tail), dtype)

    tensors = {
        "example_index": np.arange(first_example, first_example + n, dtype=np.int64),
        "pos_offsets": np.concatenate([[0], np.cumsum(pos_counts)]).astype(np.int64),
        "positions": cat([e.positions for e in examples], np.int32, ()),
        "topk_ids": cat([e.topk_ids for e in examples], np.int32, (k,)),
        "topk_probs": cat([e.topk_probs for e in examples], np.float32, (k,)),
        "topk_mass": cat([e.topk_mass for e in examples], np.float32, ()),
        "tok_offsets": np.concatenate([[0], np.cumsum(tok_counts)]).astype(np.int64),
    }
    for layer in layers:
        tensors[hidden_name(layer)] = cat([e.hidden[layer] for e in examples], np.float16, (h,))
    return tensors


def write_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, Any]:
    """Write atomically (temporary file, fsync, rename): a kill never leaves a half shard under its
    name. Returns {"sha256", "size"} of the file written."""
    with atomic_output_file(path) as tmp:
        # One metadata entry: safetensors writes several in a random order, and a recomputed shard
        # must be byte-identical to the one it replaces.
        info = json.dumps({"format": f"{FORMAT}/{FORMAT_VERSION}", **metadata}, sort_keys=True)
        save_file(tensors, str(tmp), metadata={"lightbert": info})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def shard_stats(path: Path) -> dict[str, float]:
    """Counts of a finished shard read back from its small tensors (for a shard kept from before)."""
    f = safe_open(str(path), framework="numpy")
    pos, tok = f.get_tensor("pos_offsets"), f.get_tensor("tok_offsets")
    mass = f.get_tensor("topk_mass")
    return {"examples": len(pos) - 1, "positions": int(pos[-1]), "tokens": int(tok[-1]),
            "mass_sum": float(mass.astype(np.float64).sum())}


def _rows(f, name: str, start: int, stop: int) -> np.ndarray:
    sl = f.get_slice(name)
    if stop <= start:  # safetensors refuses empty slices
        shape = sl.get_shape()
        return np.zeros((0, *shape[1:]), dtype=_NUMPY_DTYPES[sl.get_dtype()])
    return sl[start:stop]


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def soft_targets(topk_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's distribution at `temperature` over the stored support: p^(1/T) renormalised over
    the k ids, = softmax(z / T) restricted to them (see the module docstring)."""
    logp = torch.log(topk_probs.float().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.softmax(logp / temperature, dim=-1)


def read_cache_manifest(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / CACHE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {cache_dir} is not a finished cache stage output")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest; rebuild the cache stage")
    return manifest


@dataclass
class _OpenShard:
    handle: Any
    first: int
    pos_offsets: np.ndarray
    tok_offsets: np.ndarray


class CachedPairs:
    """The pairs examples of one split and view, each joined with its cached teacher outputs.

    ds[i] -> a row dict; ds[indices] -> columns (lists), as datasets.Dataset; ds["length"] -> a column.
    Rows hold the view's pairs columns plus teacher_positions (p,), teacher_topk_ids (p, k),
    teacher_topk_probs (p, k), teacher_topk_mass (p,) and teacher_hidden_<l> (t, H) float16 per layer.
    """

    def __init__(self, cache_dir: Path, pairs, split: str, view: str = "nsp", max_open_shards: int = 16):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_cache_manifest(self.cache_dir)
        entry = self.manifest["splits"].get(split, {}).get(view)
        if entry is None:
            have = [f"{s}/{v}" for s, views in self.manifest["splits"].items() for v in views]
            raise KeyError(f"the cache holds no {split}/{view} (it has {', '.join(have)}); "
                           f"add them to cache.splits / cache.views")
        if len(pairs) != entry["examples"]:
            raise ValueError(f"the pairs {split} split has {len(pairs)} examples but the cache was built over "
                             f"{entry['examples']}: they belong to different pairs outputs")
        self.split, self.view = split, view
        self.columns = VIEW_COLUMNS[view]
        self.length_column = LENGTH_COLUMN[view]
        self.pairs = pairs.select_columns([*self.columns, self.length_column])
        self.layers: list[int] = list(self.manifest["layers"])
        self.top_k: int = self.manifest["top_k"]
        # False for a teacher without an MLM head: the soft-label columns are then empty (k = 0)
        self.has_soft_labels: bool = bool(self.manifest.get("has_soft_labels", True))
        self.shards: list[dict[str, Any]] = entry["shards"]
        self._starts = np.array([s["first_example"] for s in self.shards], dtype=np.int64)
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self.opened_shards: set[int] = set()  # every shard this loader has opened (diagnostics, tests)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def shard_starts(self) -> np.ndarray:
        """The first example of each shard (the engine batches shard by shard: reads stay local)."""
        return self._starts

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    @property
    def open_shards(self) -> list[int]:
        return list(self._open)

    def _shard(self, index: int) -> _OpenShard:
        shard = self._open.get(index)
        if shard is not None:
            self._open.move_to_end(index)
            return shard
        meta = self.shards[index]
        handle = safe_open(str(self.cache_dir / meta["file"]), framework="numpy")
        shard = _OpenShard(handle, meta["first_example"], handle.get_tensor("pos_offsets"),
                           handle.get_tensor("tok_offsets"))
        self._open[index] = shard
        self.opened_shards.add(index)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # dropping the handle unmaps the file
        return shard

    def teacher_outputs(self, i: int) -> dict[str, np.ndarray]:
        """The cached tensors of example i (rows read from its shard only)."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} is outside the {self.split} split ({len(self)} examples)")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        shard = self._shard(s)
        j = i - shard.first
        p0, p1 = int(shard.pos_offsets[j]), int(shard.pos_offsets[j + 1])
        t0, t1 = int(shard.tok_offsets[j]), int(shard.tok_offsets[j + 1])
        f = shard.handle
        out = {"teacher_positions": _rows(f, "positions", p0, p1),
               "teacher_topk_ids": _rows(f, "topk_ids", p0, p1),
               "teacher_topk_probs": _rows(f, "topk_probs", p0, p1),
               "teacher_topk_mass": _rows(f, "topk_mass", p0, p1)}
        for layer in self.layers:
            out[f"teacher_{hidden_name(layer)}"] = _rows(f, hidden_name(layer), t0, t1)
        return out

    def _row(self, i: int) -> dict[str, Any]:
        row = dict(self.pairs[i])
        row.update(self.teacher_outputs(i))
        tokens = len(row[f"teacher_{hidden_name(self.layers[0])}"])
        if tokens != len(row[self.columns[0]]):
            raise ValueError(f"example {i}: the cache has {tokens} tokens, the pairs row "
                             f"{len(row[self.columns[0]])}; the cache was built from other pairs")
        return row

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.pairs[key]
        if isinstance(key, int | np.integer):
            return self._row(int(key))
        if isinstance(key, slice):
            key = range(*key.indices(len(self)))
        rows = [self._row(int(i)) for i in key]
        names = [*self.columns, self.length_column, *self.teacher_columns]
        return {name: [r[name] for r in rows] for name in names}

    def collator(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> CachedPairsCollator:
        """The collator for this loader's view and layers."""
        return CachedPairsCollator(pad_token_id, self.view, tuple(self.layers), pad_to_multiple_of)

    @property
    def teacher_columns(self) -> list[str]:
        return ["teacher_positions", "teacher_topk_ids", "teacher_topk_probs", "teacher_topk_mass",
                *(f"teacher_{hidden_name(layer)}" for layer in self.layers)]


@dataclass
class CachedPairsCollator:
    """Columns of CachedPairs -> a padded batch aligned with the padded input.

    The view's columns are padded as by engine.PadCollator (ids with pad_token_id, labels with -100);
    attention_mask is the mask of real tokens. Teacher tensors:
      teacher_hidden_<l>     (B, T, H) float16, zeros at padding
      teacher_position_mask  (B, T) bool, True where soft labels are stored (= labels != -100 in
                             masked mode, = attention_mask in all mode)
      teacher_topk_ids       (P, k) int64, teacher_topk_probs (P, k) float32, teacher_topk_mass (P,):
                             one row per True of teacher_position_mask in row-major order, i.e. aligned
                             with `hidden[teacher_position_mask]` of a student's forward
    """

    pad_token_id: int
    view: str = "nsp"
    layers: tuple[int, ...] = ()
    pad_to_multiple_of: int = 1
    _pad: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        cols = VIEW_COLUMNS[self.view]
        self._pad = PadCollator(cols, {cols[0]: self.pad_token_id, cols[3]: IGNORE_INDEX}, self.pad_to_multiple_of)

    def __call__(self, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        batch = self._pad(rows)
        ids = batch[VIEW_COLUMNS[self.view][0]]
        b, t = ids.shape
        position_mask = torch.zeros(b, t, dtype=torch.bool)
        for i, pos in enumerate(rows["teacher_positions"]):
            position_mask[i, torch.from_numpy(np.asarray(pos, dtype=np.int64))] = True
        batch["teacher_position_mask"] = position_mask
        batch["teacher_topk_ids"] = torch.from_numpy(np.concatenate(rows["teacher_topk_ids"])).long()
        batch["teacher_topk_probs"] = torch.from_numpy(np.concatenate(rows["teacher_topk_probs"]))
        batch["teacher_topk_mass"] = torch.from_numpy(np.concatenate(rows["teacher_topk_mass"]))
        for layer in self.layers:
            name = f"teacher_{hidden_name(layer)}"
            values = rows[name]
            hidden = torch.zeros(b, t, values[0].shape[1], dtype=torch.float16)
            for i, h in enumerate(values):
                hidden[i, :len(h)] = torch.from_numpy(np.asarray(h))
            batch[name] = hidden
        return batch
