"""The teacher cache on disk (format v2): shard layout, quantisation, size arithmetic, and the loader the
students train from.

Layout of the cache stage's directory:

    cache_manifest.json                        what is where (below), the settings, fingerprints, totals
    <split>/<view>/shard-00000.safetensors     examples [0, E) of the pairs split, E = cache.examples_per_shard
    <split>/<view>/shard-00001.safetensors     examples [E, 2E) ...

A shard is one safetensors file (never pickle). Per-example data is ragged, so it is stored flat with
offsets; for the shard's n examples, m soft-label positions and q hidden-state positions:

    example_index     int64   (n,)     row of the example in the pairs split (consecutive)
    pos_offsets       int64   (n+1,)   example j's soft labels are rows pos_offsets[j]:pos_offsets[j+1]
    positions         uint16  (m,)     position in the sequence (ascending per example)
    topk_ids          uint16  (m, k)   the teacher's k likeliest tokens there, most likely first
    topk_logratio     uint8   (m, k)   their log-probabilities relative to the first, quantised (below)
    topk_mass         float16 (m,)     the share of the T=1 full-vocabulary softmax the k ids cover
    hidden_offsets    int64   (n+1,)   example j's hidden rows are hidden_offsets[j]:hidden_offsets[j+1]
    hidden_positions  uint16  (q,)     position in the sequence of each hidden row (ascending per example)
    hidden_<l>        int8    (q, H)   hidden state of teacher layer l (0 = embeddings, L = last) at those
                                       positions, one tensor per cached layer ...
    hidden_<l>_scale  float16 (q,)     ... and its per-row scale: the vector is hidden_<l> * scale

and, in the train split's nsp view only, when attention maps are cached (cache.attention_layers; the
manifest's `attention` says which layers), for an example of n real tokens (heads, n, n) scores each:

    attention_offsets int64   (n+1,)   example j's scores are attention_<l>[attention_offsets[j]:...[j+1]]
    attention_<l>     float16 (s,)     teacher layer l's scores q.k/sqrt(d) between the real tokens, every
                                       head, row-major (head, query, key), flattened; one per cached layer

Attention scores are float16 (relative error 2^-11, 0.05%; they are unnormalised, so a softmax over them
for `attention: probs` is computed in the student's step). They cost heads x n^2 x 2 bytes per example and
layer, quadratic in the length (12 heads at 128 tokens: 393 KB per example and layer, 3 KB per token against
146 for the rest of a bert-base cache), so `auto` keeps them only when the whole cache fits cache.max_bytes
and otherwise the DistilBERT stage computes them with the teacher in its step, through the deepest matched
layer only (tasks/distilbert/build.py).

Ids are int32 when the vocabulary has more than 65,536 tokens, positions int32 when the teacher takes
sequences longer than 65,536 tokens (max_position_embeddings); uint16 otherwise.
Soft-label positions: the masked ones (labels != -100), or every real token with cache.positions=all.
Hidden rows: cache.hidden_positions = masked (default: the masked positions), all (every real token) or
none (no hidden states; cache.hidden_layers is then ignored). The students' Lcos is computed on the
positions that are stored, in cached and in online mode alike (tasks/distilbert/build.py).
The view is `nsp` (input_ids, the sequence BERT and DistilBERT see) or `sop` (sop_input_ids, ALBERT's).

Soft labels and temperature. With p_i = softmax(z)_i at T=1 (i = 1 the likeliest), a distillation loss at
temperature T softens them over the stored support:
    p_T,i = p_i^(1/T) / sum_{j in top-k} p_j^(1/T) = softmax(d / T)_i,  d_i = log p_i - log p_1 <= 0
which is exactly softmax(z / T) restricted to the k ids and renormalised: it needs only the log-ratios d_i
(= z_i - z_1), not the normaliser. So the shard stores d, quantised in steps of 1/16 nat:
    topk_logratio_i = min(255, round(-16 d_i))          (0 for the likeliest)
The step is fixed (no per-position scale to store) and uniform in log space, so the precision is the same
relative one for large and small probabilities; 255 steps cover ratios down to e^-15.9 = 1.2e-7 to the
likeliest. Maximum error:
  - each stored log-ratio is within 1/32 nat of the true one (3.2% in the ratio) when the ratio is at
    least e^-(255.5/16); a smaller ratio is stored as e^-(255/16), too large by less than 1.2e-7 of p_1
    (softened at T = 2: too large by at most e^-8 = 3.5e-4 of the likeliest).
  - soft_targets at temperature T from the stored codes: |log p^_T,i - log p_T,i| <= 1/(16 T) nat for
    every entry of a position whose ratios are all in range (the entry's 1/32 nat over T, plus at most the
    same for the renormalisation): within 6.5% of each probability at T=1, 3.2% at T=2.
  - the T=1 probabilities the loader gives back, topk_mass * e^d / sum(e^d), are within a factor
    e^(1/16 + 1/2048) of p_i (the 1/2048: topk_mass's fp16 rounding), i.e. 6.5%, at such positions.
`soft_targets` computes p_T from them as before (a constant factor per row cancels).

Hidden states: int8 with one scale per row (symmetric absmax): scale = fp16(max_i |h_i| / 127),
h^ = round(h / scale) clipped to +-127, times scale. Every element is within scale/2 of the true value,
i.e. within max|h| / 254 (1 + 2^-11) (0.4% of the row's largest element); fp16 scales cover rows up to
8.3e6 and the bound holds for rows whose max|h| >= 0.0078 (a normal fp16 scale), which BERT's are. The
error is relative to the row's largest element: a Gaussian row keeps a cosine above 0.9999 to the original,
one with an element 40 times its otherwise largest 0.998 (tests/cache measures both).

Size (`bytes_per_position`, `bytes_per_hidden_position`, `estimate_cache_bytes`: the estimate before
writing that cache.max_bytes checks): a soft-label position costs 2 + k (2 + 1) + 2 bytes (position, ids
and codes, mass), a hidden position 2 + layers * (H + 2) (position, int8 row, scale), an example 24 bytes
of offsets and index. At bert-base shape (H = 768, V = 30,522, k = 64, 128-token sequences, 15% of them
masked, one hidden layer at the masked positions): 29.4 B/token of soft labels + 115.8 of hidden states +
0.2 of offsets = 145.4 B/token with Lcos, 29.6 B/token without hidden states (v1: 1,614 B/token: int32
ids + float32 probabilities, 520 B per position, and fp16 hidden states at every token). tests/cache
checks these figures against the size function and a written shard.

Measured, v1 (commit 1a52695) against v2, at the cpu preset: MiniLM-L6 teacher with its fitted MLM head
(H = 384, V = 30,522), k = 64, 479,463 cached tokens (train split, nsp and sop views, pairs of at most 64
tokens, 14% masked); 3-layer DistilBERT, 150 steps. Each run:
    PYTHONPATH=<v1 or v2 worktree> OMP_NUM_THREADS=2 python -m flows.cli run --preset cpu \
        --until distilbert --workdir /tmp/cv1 (v1) | /tmp/cv2 (v2) [--set cache.hidden_positions=all]
on 2 cores shared with another user (load 1-3 during the runs, so the times are rough):

                            cache on disk  B/token  cache s  distilbert s  val MLM accuracy        perplexity  loss
    v1                          403.3 MB    841.1     84.6      103.9      0.1143 [0.102, 0.128]    743.9     6.612
    v2 (hidden at masked)        39.4 MB     82.0    102.5      146.7      0.1182 [0.106, 0.132]    828.2     6.719
    v2 hidden_positions=all     199.4 MB    415.8    137.7      225.4      0.1143                   743.9     6.612

Accuracy over the 2,327 masked validation tokens, with 95% Wilson intervals (tasks.scoring.wilson_interval).
v2 with hidden states at every token predicts exactly as v1 (none of the 2,327 tokens differs): the
quantisation costs nothing measurable here. Default v2 (Lcos at the masked positions only) is +0.0039 in
accuracy (paired 95% CI -0.0019 .. +0.0096; 28 vs 19 discordant tokens, McNemar p = 0.24) and has a higher
perplexity (828 against 744): that comes from computing Lcos on other tokens, not from the quantisation.
The stage times follow the machine's load: the cache stage's per-batch work, v1 and v2 run alternately,
took 5.1 and 5.5 s (v1) against 5.5 and 5.7 s (v2) per 16k-token batch; the loader reads and collates a
32-example batch in 2.5 ms from either cache.

The loader (`CachedPairs` + `CachedPairsCollator`) joins the pairs examples with their cached tensors.
It opens a shard only when an example of it is asked for, reads only that example's rows (safetensors
slices of a memory map), and keeps at most `max_open_shards` shards open; the cache is never loaded
whole. It has the two things the training engine asks of a dataset (`ds["length"]` and `ds[indices]`
returning columns), so `engine.train(model, loss_fn, CachedPairs(...), cfg, CachedPairsCollator(...))`
batches it like the plain pairs.
"""

from __future__ import annotations

import json
import math
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
FORMAT_VERSION = 2
CACHE_MANIFEST = "cache_manifest.json"
LOGRATIO_STEPS_PER_NAT = 16  # topk_logratio codes: -16 * log(p_i / p_1), rounded, at most 255
HEADER_BYTES_PER_TENSOR = 72  # one safetensors JSON header entry, about; plus the metadata below
HEADER_BYTES_FIXED = 160
OFFSET_TENSORS = ("example_index", "pos_offsets", "hidden_offsets")  # int64, one entry per example (+1)


def hidden_name(layer: int) -> str:
    return f"hidden_{layer}"


def attention_name(layer: int) -> str:
    return f"attention_{layer}"


def scale_name(layer: int) -> str:
    return f"hidden_{layer}_scale"


def shard_relpath(split: str, view: str, index: int) -> str:
    return f"{split}/{view}/shard-{index:05d}.safetensors"


def index_dtype(limit: int) -> np.dtype:
    """The dtype of ids in [0, limit): uint16 when they fit (limit <= 65,536), else int32."""
    return np.dtype(np.uint16) if limit <= 2 ** 16 else np.dtype(np.int32)


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
def bytes_per_position(top_k: int, vocab_size: int, max_positions: int) -> int:
    """One soft-label position: its position, k ids and k log-ratio codes, the fp16 top-k mass."""
    return index_dtype(max_positions).itemsize + top_k * (index_dtype(vocab_size).itemsize + 1) + 2


def bytes_per_hidden_position(hidden_size: int, n_layers: int, max_positions: int) -> int:
    """One hidden-state position: its position, and per layer an int8 row and its fp16 scale."""
    return index_dtype(max_positions).itemsize + n_layers * (hidden_size + 2) if n_layers else 0


def shard_overhead_bytes(n_layers: int, n_attention: int = 0) -> int:
    tensors = 8 + 2 * n_layers + (1 + n_attention if n_attention else 0)
    return HEADER_BYTES_FIXED + HEADER_BYTES_PER_TENSOR * tensors + 2 * 8  # + two offsets' n+1


def attention_bytes(squared_lengths: int, heads: int, n_layers: int) -> int:
    """Bytes of the cached attention maps: float16 (heads, n, n) per example and layer, and the offsets."""
    return 2 * heads * squared_lengths * n_layers if n_layers else 0


@dataclass
class PartSize:
    """One split x view of the cache: what its size is made of."""

    examples: int
    tokens: int
    positions: int  # soft-label positions
    hidden_positions: int
    shards: int
    squared_lengths: int = 0  # sum of n^2 over the examples (the attention maps' size), where they are cached


def estimate_cache_bytes(parts: dict[str, PartSize], top_k: int, vocab_size: int, max_positions: int,
                         hidden_size: int, n_layers: int, heads: int = 0, n_attention: int = 0,
                         attention_part: str = "train/nsp") -> dict[str, int]:
    """Bytes the shards will take, by part (hidden states, soft labels, attention maps of n_attention layers
    in attention_part, offsets and headers)."""
    hidden = sum(p.hidden_positions for p in parts.values()) * bytes_per_hidden_position(
        hidden_size, n_layers, max_positions)
    soft = sum(p.positions for p in parts.values()) * bytes_per_position(top_k, vocab_size, max_positions)
    attention = attention_bytes(parts[attention_part].squared_lengths, heads, n_attention) \
        if n_attention and attention_part in parts else 0
    index = 0
    for name, p in parts.items():
        n_att = n_attention if name == attention_part else 0
        index += (p.examples * 8 * (len(OFFSET_TENSORS) + (1 if n_att else 0))
                  + p.shards * shard_overhead_bytes(n_layers, n_att))
    return {"hidden_states": hidden, "soft_labels": soft, "attention": attention, "index": index,
            "total": hidden + soft + attention + index}


# ------------------------------------------------------------------------------------------------
# quantisation (see the module docstring for the error bounds)
# ------------------------------------------------------------------------------------------------
def quantise_logprobs(topk_logp: torch.Tensor) -> torch.Tensor:
    """(p, k) log-probabilities -> (p, k) uint8 codes of their log-ratio to the row's largest."""
    if topk_logp.numel() == 0:
        return torch.zeros(topk_logp.shape, dtype=torch.uint8, device=topk_logp.device)
    ratio = topk_logp.amax(-1, keepdim=True) - topk_logp  # >= 0
    return (ratio * LOGRATIO_STEPS_PER_NAT).round().clamp(max=255).to(torch.uint8)


def probs_from_codes(codes: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """(p, k) codes and (p,) top-k mass -> the T=1 probabilities of the k ids, float32."""
    d = -codes.astype(np.float64) / LOGRATIO_STEPS_PER_NAT
    if d.size == 0:
        return d.astype(np.float32)
    norm = np.log(np.exp(d).sum(-1, keepdims=True))  # d_1 = 0, so the sum is >= 1: no overflow
    return np.exp(np.log(mass.astype(np.float64))[:, None] + d - norm).astype(np.float32)


def quantise_hidden(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, H) float -> (q, H) int8 and (q,) float16 scales (symmetric absmax per row). Rows are quantised
    with the fp16 scale as stored, so that the reconstruction error stays within scale / 2."""
    h = hidden.float()
    scale = (h.abs().amax(-1) / 127).to(torch.float16) if h.shape[-1] else h.new_zeros(h.shape[0]).half()
    divisor = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # a zero row stays zero
    return (h / divisor).round().clamp(-127, 127).to(torch.int8), scale


def dequantise_hidden(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) * scale.astype(np.float32)[:, None]


# ------------------------------------------------------------------------------------------------
# writing and reading one shard
# ------------------------------------------------------------------------------------------------
@dataclass
class ExampleOutputs:
    """The teacher's outputs for one example, quantised, before packing."""

    positions: np.ndarray  # (p,) soft-label positions
    topk_ids: np.ndarray  # (p, k)
    topk_logratio: np.ndarray  # (p, k) uint8 codes
    topk_mass: np.ndarray  # (p,) float16
    hidden_positions: np.ndarray  # (q,)
    hidden: dict[int, np.ndarray]  # layer -> (q, H) int8
    hidden_scale: dict[int, np.ndarray]  # layer -> (q,) float16
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (heads * n * n,) float16


def pack_shard(first_example: int, examples: Sequence[ExampleOutputs], layers: Sequence[int], vocab_size: int,
               max_positions: int, hidden_size: int, attention_layers: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Flatten a shard's examples (in example order) into the tensors listed in the module docstring."""
    n = len(examples)
    k = examples[0].topk_ids.shape[1] if n else 0
    ids, pos = index_dtype(vocab_size), index_dtype(max_positions)

    def cat(arrays: list[np.ndarray], dtype, tail: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(arrays).astype(dtype, copy=False)) if arrays \
            else np.zeros((0, *tail), dtype)

    def offsets(counts: list[int]) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    tensors = {
        "example_index": np.arange(first_example, first_example + n, dtype=np.int64),
        "pos_offsets": offsets([len(e.positions) for e in examples]),
        "positions": cat([e.positions for e in examples], pos, ()),
        "topk_ids": cat([e.topk_ids for e in examples], ids, (k,)),
        "topk_logratio": cat([e.topk_logratio for e in examples], np.uint8, (k,)),
        "topk_mass": cat([e.topk_mass for e in examples], np.float16, ()),
        "hidden_offsets": offsets([len(e.hidden_positions) for e in examples]),
        "hidden_positions": cat([e.hidden_positions for e in examples], pos, ()),
    }
    for layer in layers:
        tensors[hidden_name(layer)] = cat([e.hidden[layer] for e in examples], np.int8, (hidden_size,))
        tensors[scale_name(layer)] = cat([e.hidden_scale[layer] for e in examples], np.float16, ())
    if attention_layers:
        first = attention_layers[0]
        tensors["attention_offsets"] = offsets([len(e.attention[first]) for e in examples])
        for layer in attention_layers:
            tensors[attention_name(layer)] = cat([e.attention[layer] for e in examples], np.float16, ())
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
    pos, hid = f.get_tensor("pos_offsets"), f.get_tensor("hidden_offsets")
    mass = f.get_tensor("topk_mass")
    return {"examples": len(pos) - 1, "positions": int(pos[-1]), "hidden_positions": int(hid[-1]),
            "mass_sum": float(mass.astype(np.float64).sum())}


def _rows(f, name: str, start: int, stop: int) -> np.ndarray:
    sl = f.get_slice(name)
    if stop <= start:  # safetensors refuses empty slices
        shape = sl.get_shape()
        return np.zeros((0, *shape[1:]), dtype=_NUMPY_DTYPES[sl.get_dtype()])
    return sl[start:stop]


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I8": np.int8, "U8": np.uint8, "U16": np.uint16,
                 "I32": np.int32, "I64": np.int64}


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
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest; rebuild the cache stage")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"the teacher cache in {cache_dir} is format v{manifest.get('version')}, this code reads "
                         f"v{FORMAT_VERSION} only: rebuild the cache stage (`lightbert run` rebuilds it)")
    return manifest


@dataclass
class _OpenShard:
    handle: Any
    first: int
    pos_offsets: np.ndarray
    hidden_offsets: np.ndarray
    attention_offsets: np.ndarray | None = None


class CachedPairs:
    """The pairs examples of one split and view, each joined with its cached teacher outputs.

    ds[i] -> a row dict; ds[indices] -> columns (lists), as datasets.Dataset; ds["length"] -> a column.
    Rows hold the view's pairs columns plus teacher_positions (p,), teacher_topk_ids (p, k),
    teacher_topk_probs (p, k) float32 (T=1, decoded from the codes), teacher_topk_mass (p,),
    teacher_hidden_positions (q,) and teacher_hidden_<l> (q, H) float32 (dequantised) per cached layer, and
    teacher_attention_<l> (heads, n, n) float16 per cached attention layer (of those in `attention`).
    """

    def __init__(self, cache_dir: Path, pairs, split: str, view: str = "nsp", max_open_shards: int = 16,
                 attention: Sequence[int] | None = None):
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
        self.hidden_positions: str = self.manifest["hidden_positions"]
        self.top_k: int = self.manifest["top_k"]
        # False for a teacher without an MLM head: the soft-label columns are then empty (k = 0)
        self.has_soft_labels: bool = bool(self.manifest.get("has_soft_labels", True))
        wanted, attention = attention, self.manifest.get("attention") or {}
        here = (attention.get("split"), attention.get("view")) == (split, view)
        # teacher layers whose attention scores this part holds (the train split's nsp view at most)
        cached = list(attention.get("layers", [])) if here else []
        # the ones read: `attention` of them (None = every cached one); others are not read at all
        self.attention_layers: list[int] = cached if wanted is None else [a for a in cached if a in wanted]
        self.attention_heads: int = int(attention.get("heads", 0))
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
                           handle.get_tensor("hidden_offsets"),
                           handle.get_tensor("attention_offsets") if self.attention_layers else None)
        self._open[index] = shard
        self.opened_shards.add(index)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # dropping the handle unmaps the file
        return shard

    def teacher_outputs(self, i: int) -> dict[str, np.ndarray]:
        """The cached tensors of example i (rows read from its shard only), decoded."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} is outside the {self.split} split ({len(self)} examples)")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        shard = self._shard(s)
        j = i - shard.first
        p0, p1 = int(shard.pos_offsets[j]), int(shard.pos_offsets[j + 1])
        h0, h1 = int(shard.hidden_offsets[j]), int(shard.hidden_offsets[j + 1])
        f = shard.handle
        mass = _rows(f, "topk_mass", p0, p1)
        out = {"teacher_positions": _rows(f, "positions", p0, p1),
               "teacher_topk_ids": _rows(f, "topk_ids", p0, p1),
               "teacher_topk_probs": probs_from_codes(_rows(f, "topk_logratio", p0, p1), mass),
               "teacher_topk_mass": mass,
               "teacher_hidden_positions": _rows(f, "hidden_positions", h0, h1)}
        for layer in self.layers:
            out[f"teacher_{hidden_name(layer)}"] = dequantise_hidden(_rows(f, hidden_name(layer), h0, h1),
                                                                    _rows(f, scale_name(layer), h0, h1))
        if self.attention_layers:
            a0, a1 = int(shard.attention_offsets[j]), int(shard.attention_offsets[j + 1])
            n = math.isqrt((a1 - a0) // max(self.attention_heads, 1))
            for layer in self.attention_layers:
                out[f"teacher_{attention_name(layer)}"] = _rows(f, attention_name(layer), a0, a1).reshape(
                    self.attention_heads, n, n)
        return out

    def _row(self, i: int) -> dict[str, Any]:
        row = dict(self.pairs[i])
        row.update(self.teacher_outputs(i))
        length = len(row[self.columns[0]])
        if self.attention_layers and row[f"teacher_{attention_name(self.attention_layers[0])}"].shape[-1] != length:
            raise ValueError(f"example {i}: the cache has attention maps over "
                             f"{row[f'teacher_{attention_name(self.attention_layers[0])}'].shape[-1]} tokens but the "
                             f"pairs row has {length}; the cache was built from other pairs")
        for name in ("teacher_positions", "teacher_hidden_positions"):
            if len(row[name]) and int(row[name][-1]) >= length:
                raise ValueError(f"example {i}: the cache has a position {int(row[name][-1])} past the pairs row's "
                                 f"{length} tokens; the cache was built from other pairs")
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
        return CachedPairsCollator(pad_token_id, self.view, tuple(self.layers), pad_to_multiple_of,
                                   tuple(self.attention_layers))

    @property
    def teacher_columns(self) -> list[str]:
        return ["teacher_positions", "teacher_topk_ids", "teacher_topk_probs", "teacher_topk_mass",
                "teacher_hidden_positions", *(f"teacher_{hidden_name(layer)}" for layer in self.layers),
                *(f"teacher_{attention_name(layer)}" for layer in self.attention_layers)]


def _position_mask(b: int, t: int, positions: list) -> torch.Tensor:
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, pos in enumerate(positions):
        mask[i, torch.from_numpy(np.asarray(pos, dtype=np.int64))] = True
    return mask


def _cat(values: list, dtype) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.asarray(v) for v in values]).astype(dtype, copy=False))


@dataclass
class CachedPairsCollator:
    """Columns of CachedPairs -> a padded batch aligned with the padded input.

    The view's columns are padded as by engine.PadCollator (ids with pad_token_id, labels with -100);
    attention_mask is the mask of real tokens. Teacher tensors, each one row per True of its mask in
    row-major order, i.e. aligned with `x[mask]` of a student's (B, T, ...) output x:
      teacher_position_mask  (B, T) bool, True where soft labels are stored (= labels != -100 in
                             masked mode, = attention_mask in all mode)
      teacher_topk_ids       (P, k) int64, teacher_topk_probs (P, k) float32, teacher_topk_mass (P,)
      teacher_hidden_mask    (B, T) bool, True where hidden states are stored (cache.hidden_positions)
      teacher_hidden_<l>     (Q, H) float32
      teacher_attention_<l>  (B, heads, T, T) float32, the scores between real tokens (0 elsewhere), for
                             each cached attention layer
    """

    pad_token_id: int
    view: str = "nsp"
    layers: tuple[int, ...] = ()
    pad_to_multiple_of: int = 1
    attention_layers: tuple[int, ...] = ()
    _pad: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        cols = VIEW_COLUMNS[self.view]
        self._pad = PadCollator(cols, {cols[0]: self.pad_token_id, cols[3]: IGNORE_INDEX}, self.pad_to_multiple_of)

    def __call__(self, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        batch = self._pad(rows)
        b, t = batch[VIEW_COLUMNS[self.view][0]].shape
        batch["teacher_position_mask"] = _position_mask(b, t, rows["teacher_positions"])
        batch["teacher_topk_ids"] = _cat(rows["teacher_topk_ids"], np.int64)
        batch["teacher_topk_probs"] = _cat(rows["teacher_topk_probs"], np.float32)
        batch["teacher_topk_mass"] = _cat(rows["teacher_topk_mass"], np.float32)
        batch["teacher_hidden_mask"] = _position_mask(b, t, rows["teacher_hidden_positions"])
        for layer in self.layers:
            name = f"teacher_{hidden_name(layer)}"
            batch[name] = _cat(rows[name], np.float32)
        for layer in self.attention_layers:
            name = f"teacher_{attention_name(layer)}"
            maps = rows[name]
            padded = torch.zeros(b, maps[0].shape[0] if maps else 0, t, t)
            for i, m in enumerate(maps):  # a pairs row is its real tokens: the padding follows them
                n = m.shape[-1]
                padded[i, :, :n, :n] = torch.from_numpy(np.asarray(m, dtype=np.float32))
            batch[name] = padded
        return batch
