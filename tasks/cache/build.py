"""Cache stage: run the teacher once over every pairs example (every masked copy) and keep what the
students learn from: top-k soft labels at the masked positions (or every real position) and the hidden
states of the chosen teacher layers at the masked positions (or every real token, or none), quantised
(uint8 log-ratio codes, int8 rows with a scale). Format, error bounds and loader: tasks/cache/outputs.py.
A teacher without an MLM head (teacher.mlm_head: none) gives hidden states only: the shards then hold no
soft labels (k = 0) and the cache manifest says `has_soft_labels: false`.

- Size first: the bytes are estimated from the pairs (lengths, masked counts) and the settings before
  anything is computed; over cache.max_bytes the stage stops with the estimate, its parts and the
  settings that would shrink it.
- Inference: model.eval() under torch.inference_mode, bf16 autocast on a GPU (fp32 on a CPU), batches
  of similar lengths up to cache.batch_tokens padded tokens. The MLM head runs only at the stored
  positions (hidden states gathered first) and in float32 even under autocast: its output is the soft
  labels, and at the masked positions it is a small share of the FLOPs.
- Shards are independent: each is written atomically and its sha256 recorded in cache_progress.json
  right after. A resumed attempt keeps every shard that matches its record and recomputes the rest; a
  damaged finished output with the same key (ctx.salvage_dir) lends its intact shards the same way.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForPreTraining, BertModel

from models.distilbert import resolve_layer_map
from models.intermediate import bert_attention_scores, real_token_scores
from tasks import engine
from tasks.artifacts import atomic_write_json, matches_record, read_json_or_empty
from tasks.cache.config import requested_attention_layers
from tasks.cache.outputs import (
    CACHE_MANIFEST,
    FORMAT,
    FORMAT_VERSION,
    IGNORE_INDEX,
    LOGRATIO_STEPS_PER_NAT,
    ExampleOutputs,
    PartSize,
    attention_name,
    bytes_per_hidden_position,
    bytes_per_position,
    estimate_cache_bytes,
    hidden_name,
    index_dtype,
    pack_shard,
    quantise_hidden,
    quantise_logprobs,
    scale_name,
    shard_relpath,
    shard_stats,
    write_shard,
)
from tasks.config import PipelineConfig
from tasks.pairs import outputs as pairs_output
from tasks.pairs.outputs import LENGTH_COLUMN, VIEW_COLUMNS, PairsSplit
from tasks.stage import StageContext, StageError, StageReport, read_manifest
from tasks.teacher.outputs import load_saved

PROGRESS = "cache_progress.json"
COUNTED = ("examples", "tokens", "positions", "hidden_positions")  # per shard, summed per split/view
ATTENTION_PART = ("train", "nsp")  # the split and view whose attention maps are cached: what DistilBERT reads
HEAD_CHUNK = 8192  # positions per MLM-head call: bounds the (positions x vocabulary) float32 logits


@dataclass(frozen=True)
class ShardPlan:
    split: str
    view: str
    index: int
    start: int  # first example (row of the pairs split)
    stop: int

    @property
    def file(self) -> str:
        return shard_relpath(self.split, self.view, self.index)

    @property
    def has_attention(self) -> bool:
        return (self.split, self.view) == ATTENTION_PART


# ------------------------------------------------------------------------------------------------
# planning and the byte budget
# ------------------------------------------------------------------------------------------------
def resolve_layers(setting: str | list[int], num_layers: int, cfg: PipelineConfig | None = None) -> list[int]:
    """The teacher layers cache.hidden_layers names; 'mapped' = distilbert.layer_map's and the last (the
    cache and the distilbert stage both resolve it here, so they agree)."""
    if setting == "mapped":
        if cfg is None:
            raise ValueError("cache.hidden_layers=mapped is resolved from the configuration's distilbert section")
        try:
            mapped = resolve_layer_map(num_layers, cfg.distilbert.num_layers, cfg.distilbert.layer_map)
        except ValueError as exc:
            raise StageError(str(exc)) from exc
        return sorted({*mapped, num_layers})
    layers = [num_layers] if setting == "last" else list(setting)
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad:
        raise StageError(f"cache.hidden_layers {setting} names layer(s) {bad}, but the teacher has "
                         f"{num_layers} layers (0 = embeddings ... {num_layers} = last)")
    return layers


def part_size(ds: PairsSplit, view: str, positions: str, hidden_positions: str, examples_per_shard: int,
              soft_labels: bool = True) -> PartSize:
    """The counts the size estimate needs; positions / hidden_positions: masked | all | none."""
    lengths = np.asarray(ds[LENGTH_COLUMN[view]], dtype=np.int64) if len(ds) else np.zeros(0, np.int64)
    tokens = int(lengths.sum())
    soft_at = positions if soft_labels else "none"
    masked = int(ds.label_counts(view).sum()) if "masked" in (soft_at, hidden_positions) else 0
    stored = {"masked": masked, "all": tokens, "none": 0}
    return PartSize(len(ds), tokens, stored[soft_at], stored[hidden_positions], math.ceil(len(ds) / examples_per_shard),
                    int((lengths * lengths).sum()))


def resolve_attention_layers(cfg: PipelineConfig, tconf: BertConfig) -> list[int]:
    """cache.attention_layers as teacher layers (auto: distilbert.matches' attention layers in cached mode),
    checked against the teacher; none when the cache holds no train split of the nsp view."""
    layers = requested_attention_layers(cfg)
    bad = [layer for layer in layers if not 1 <= layer <= tconf.num_hidden_layers]
    if bad:
        source = "distilbert.matches (through cache.attention_layers: auto)" if cfg.cache.attention_layers == "auto" \
            else f"cache.attention_layers {cfg.cache.attention_layers}"
        raise StageError(f"{source} names teacher layer(s) {bad} for attention maps, but the teacher has "
                         f"{tconf.num_hidden_layers} layers: use layers 1 to {tconf.num_hidden_layers}")
    if layers and (ATTENTION_PART[0] not in cfg.cache.splits or ATTENTION_PART[1] not in cfg.cache.views):
        if cfg.cache.attention_layers != "auto":
            raise StageError(f"cache.attention_layers {layers} keeps attention maps for the train split's nsp view, "
                             f"but cache.splits is {cfg.cache.splits} and cache.views {cfg.cache.views}: include "
                             "train and nsp, or set cache.attention_layers: auto")
        return []
    return layers


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def over_budget_message(cfg: PipelineConfig, estimate: dict[str, int], parts: dict[str, PartSize],
                        tconf: BertConfig, layers: list[int], attention: list[int] = ()) -> str:
    cc = cfg.cache
    h, vocab, max_len = tconf.hidden_size, tconf.vocab_size, tconf.max_position_embeddings
    hidden_at = sum(p.hidden_positions for p in parts.values())
    positions = sum(p.positions for p in parts.values())
    per_layer = hidden_at * (h + 2)
    lines = [
        f"the teacher cache would take an estimated {_gb(estimate['total'])} ({estimate['total']:,} bytes), "
        f"over the budget cache.max_bytes = {_gb(cc.max_bytes)} ({cc.max_bytes:,} bytes).",
        f"  hidden states: {_gb(estimate['hidden_states'])} = {hidden_at:,} positions ({cc.hidden_positions}) x "
        f"{bytes_per_hidden_position(h, len(layers), max_len)} bytes ({len(layers)} layer(s) {layers} x "
        f"({h} int8 + 2 scale) + 2 position)",
        f"  soft labels:   {_gb(estimate['soft_labels'])} = {positions:,} positions ({cc.positions}) x "
        f"{bytes_per_position(cc.top_k, vocab, max_len)} bytes (top_k {cc.top_k} ids + log-ratio codes)",
        *([f"  attention maps: {_gb(estimate['attention'])} = layers {attention} x {tconf.num_attention_heads} "
           "heads x n^2 float16 per train example (cache.attention_layers; [] computes them in the student's step)"]
          if attention else []),
        f"  offsets and headers: {_gb(estimate['index'])}",
        "  by split/view: " + ", ".join(f"{name} {p.examples:,} examples, {p.tokens:,} tokens"
                                        for name, p in parts.items()),
        "Settings that shrink it:",
        f"  cache.hidden_layers: each cached layer costs {_gb(per_layer)}"
        + (" (already one layer)" if len(layers) == 1 else f"; {len(layers)} are cached now"),
        f"  cache.hidden_positions: {cc.hidden_positions} now; masked keeps the masked positions only (about "
        "15%), none keeps no hidden states (no Lcos from the cache)",
        f"  cache.top_k: {cc.top_k} -> 16 makes the soft labels "
        f"{_gb(positions * bytes_per_position(16, vocab, max_len))}",
    ]
    if cc.positions == "all":
        lines.append("  cache.positions: masked keeps soft labels at the masked positions only (about 15%)")
    else:
        lines.append("  cache.positions: already masked (soft labels at the masked positions only)")
    lines += [
        f"  pairs.dupe_factor: the train split is {cfg.pairs.dupe_factor} masked copies of the corpus; "
        "the size is about proportional to it",
        f"  cache.splits {cc.splits} / cache.views {cc.views}: cache fewer of them",
        f"  cache.max_bytes: raise it to at least {estimate['total']:,} if the disk has room",
    ]
    return "\n".join(lines)


def plan_shards(split: str, view: str, n_examples: int, examples_per_shard: int) -> list[ShardPlan]:
    return [ShardPlan(split, view, i, start, min(start + examples_per_shard, n_examples))
            for i, start in enumerate(range(0, n_examples, examples_per_shard))]


def token_budget_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Index arrays of batches of similar length, each at most batch_tokens padded tokens (at least one
    example). The engine's length_bucketed_batches has a fixed batch size and shuffles for training;
    inference wants the largest batch that fits, longest first so that memory peaks at once."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, i = [], 0
    while i < len(order):
        size = max(1, batch_tokens // max(int(lengths[order[i]]), 1))
        batches.append(order[i:i + size])
        i += size
    return batches


# ------------------------------------------------------------------------------------------------
# keeping finished shards: an interrupted attempt's (resume) or a damaged output's (salvage)
# ------------------------------------------------------------------------------------------------
def keep_finished_shards(ctx: StageContext, plan: list[ShardPlan]) -> dict[str, dict[str, Any]]:
    """{shard file: {sha256, size, kept_from}} of the planned shards that need no computing. Anything
    else left in out_dir (a shard that fails its checksum, a half-written temporary file) is removed."""
    wanted = {s.file for s in plan}
    kept: dict[str, dict[str, Any]] = {}
    if ctx.resuming:
        recorded = {**read_json_or_empty(ctx.out_dir / CACHE_MANIFEST).get("shard_files", {}),
                    **read_json_or_empty(ctx.out_dir / PROGRESS).get("shards", {})}
        for rel in sorted(wanted & recorded.keys()):
            if matches_record(ctx.out_dir / rel, recorded[rel]):
                kept[rel] = {**recorded[rel], "kept_from": "interrupted attempt"}
    for path in sorted(p for p in ctx.out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(ctx.out_dir).as_posix()
        if rel not in kept and rel != PROGRESS:
            path.unlink()
    if ctx.salvage_dir is not None:
        files = (read_manifest(ctx.salvage_dir) or {}).get("files", {})
        for rel in sorted(wanted - kept.keys()):
            src, dst = ctx.salvage_dir / rel, ctx.out_dir / rel
            if matches_record(src, files.get(rel)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)  # the old output is replaced at the end; the link keeps the data
                except OSError:
                    shutil.copy2(src, dst)
                kept[rel] = {"sha256": files[rel]["sha256"], "size": files[rel]["size"],
                             "kept_from": "previous output"}
    return kept


# ------------------------------------------------------------------------------------------------
# the teacher forward
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def teacher_outputs(model: BertForPreTraining | BertModel, batch: dict[str, torch.Tensor], view: str,
                    layers: list[int], top_k: int, positions: str, hidden_positions: str,
                    rt: engine.Runtime, attention_layers: tuple[int, ...] = ()) -> list[ExampleOutputs]:
    """The cached quantities of every example of a padded batch (in batch order), quantised; top_k = 0:
    hidden states only (a teacher without an MLM head); attention_layers: those layers' scores between
    the real tokens, float16."""
    ids, types, attention, labels = (batch[c].to(rt.device) for c in VIEW_COLUMNS[view][:4])
    backbone = model.bert if hasattr(model, "bert") else model
    with rt.autocast():
        out = backbone(input_ids=ids, attention_mask=attention, token_type_ids=types,
                       output_hidden_states=True, return_dict=True)
    real = attention.bool()
    masked = real & (labels != IGNORE_INDEX)
    where = torch.zeros_like(real) if top_k == 0 else masked if positions == "masked" else real
    hidden_where = {"masked": masked, "all": real, "none": torch.zeros_like(real)}[hidden_positions]
    gathered = out.hidden_states[-1][where].float()
    top_lp, top_i = [], []
    for c in range(0, len(gathered), HEAD_CHUNK):
        logits = model.cls.predictions(gathered[c:c + HEAD_CHUNK]).float()
        top = logits.log_softmax(-1).topk(top_k, dim=-1)
        top_lp.append(top.values)
        top_i.append(top.indices)
    logp = torch.cat(top_lp) if top_lp else gathered.new_zeros(0, top_k)
    token_ids = torch.cat(top_i) if top_i else torch.zeros(0, top_k, dtype=torch.long, device=ids.device)
    hidden, scales = {}, {}
    for layer in layers:
        values, scale = quantise_hidden(out.hidden_states[layer][hidden_where])
        if not torch.isfinite(scale).all():
            raise StageError(f"teacher layer {layer} has hidden values too large for a float16 scale (|h| > 8.3e6); "
                             "cache.precision=fp32 or other cache.hidden_layers may avoid it")
        hidden[layer], scales[layer] = values.cpu().numpy(), scale.cpu().numpy()

    def split_rows(mask: torch.Tensor, values: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        values = values.cpu().numpy() if isinstance(values, torch.Tensor) else values
        return np.split(values, np.cumsum(mask.sum(1).cpu().numpy())[:-1])

    pos = split_rows(where, where.nonzero()[:, 1].to(torch.int32))
    ids_np = split_rows(where, token_ids.to(torch.int32))
    codes = split_rows(where, quantise_logprobs(logp))
    mass = split_rows(where, logp.exp().sum(-1).to(torch.float16))
    hidden_pos = split_rows(hidden_where, hidden_where.nonzero()[:, 1].to(torch.int32))
    hidden_np = {layer: split_rows(hidden_where, h) for layer, h in hidden.items()}
    scales_np = {layer: split_rows(hidden_where, s) for layer, s in scales.items()}
    maps: dict[int, list[np.ndarray]] = {}
    for layer in attention_layers:
        scores = bert_attention_scores(backbone, out.hidden_states, layer).to(torch.float16)
        if not torch.isfinite(scores).all():
            raise StageError(f"teacher layer {layer} has attention scores too large for float16 (|s| > 65504); "
                             "drop it from cache.attention_layers (set []), which computes them in the student's step")
        maps[layer] = [m.reshape(-1).cpu().numpy() for m in real_token_scores(scores, attention)]
    return [ExampleOutputs(pos[j], ids_np[j], codes[j], mass[j], hidden_pos[j],
                           {layer: hidden_np[layer][j] for layer in layers},
                           {layer: scales_np[layer][j] for layer in layers},
                           {layer: maps[layer][j] for layer in attention_layers})
            for j in range(len(pos))]


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheRecipe:
    """What every shard of a run shares (sent once to each worker)."""

    teacher_dir: Path
    pairs_dir: Path
    out_dir: Path
    views: tuple[str, ...]
    layers: tuple[int, ...]
    top_k: int
    positions: str
    hidden_positions: str
    batch_tokens: int
    precision: str
    attention_layers: tuple[int, ...] = ()  # cached for the ATTENTION_PART shards only

    def attention_for(self, shard: ShardPlan) -> tuple[int, ...]:
        return self.attention_layers if shard.has_attention else ()


def view_collators(tconf: BertConfig, views, rt: engine.Runtime) -> dict[str, engine.PadCollator]:
    pad_id = tconf.pad_token_id if tconf.pad_token_id is not None else 0
    multiple = 8 if rt.device.type == "cuda" else 1
    return {v: engine.PadCollator(VIEW_COLUMNS[v][:4], {VIEW_COLUMNS[v][0]: pad_id, VIEW_COLUMNS[v][3]: IGNORE_INDEX},
                                  multiple) for v in views}


def finish_shard(shard: ShardPlan, slots: list, recipe: CacheRecipe, tconf: BertConfig) -> tuple[dict, dict]:
    """Pack and write one shard's outputs: (its file record {sha256, size}, its counts)."""
    attention = recipe.attention_for(shard)
    tensors = pack_shard(shard.start, slots, list(recipe.layers), tconf.vocab_size, tconf.max_position_embeddings,
                         tconf.hidden_size, attention)
    meta = {"split": shard.split, "view": shard.view, "first_example": str(shard.start),
            "top_k": str(recipe.top_k), "positions": recipe.positions, "hidden_positions": recipe.hidden_positions,
            "layers": ",".join(map(str, recipe.layers)), **({"attention_layers": ",".join(map(str, attention))}
                                                             if attention else {})}
    record = write_shard(recipe.out_dir / shard.file, tensors, meta)
    return record, {"examples": len(slots), "positions": len(tensors["positions"]),
                    "hidden_positions": len(tensors["hidden_positions"]),
                    "mass_sum": float(tensors["topk_mass"].astype(np.float64).sum())}


_WORKER_STATE: dict[tuple, Any] = {}  # a worker process's teacher and pairs, loaded for its first shard


@dataclass(frozen=True)
class CacheJob:
    shard: ShardPlan
    lengths: np.ndarray  # the shard's examples' lengths (its batches are planned from them)

    @property
    def name(self) -> str:
        return self.shard.file.removesuffix(".safetensors")


def run_cache_shard(job: CacheJob, recipe: CacheRecipe) -> tuple[dict, dict]:
    """One shard computed on its own (a task on a Dask worker): the teacher and the pairs split are
    loaded once per worker process. Returns finish_shard's (record, counts) with the device used."""
    shard = job.shard
    key = (str(recipe.teacher_dir), str(recipe.pairs_dir), shard.split, recipe.precision)
    if key not in _WORKER_STATE:
        _WORKER_STATE.clear()
        saved = load_saved(recipe.teacher_dir)
        rt = engine.setup_runtime(recipe.precision)
        data = pairs_output.load_split(recipe.pairs_dir, shard.split, views=recipe.views)
        _WORKER_STATE[key] = (saved.config, saved.load_model().to(rt.device), rt, data)
    tconf, model, rt, data = _WORKER_STATE[key]
    collate = view_collators(tconf, [shard.view], rt)[shard.view]
    columns = data.select_columns(list(VIEW_COLUMNS[shard.view][:4]))
    slots: list[ExampleOutputs | None] = [None] * (shard.stop - shard.start)
    for idx in token_budget_batches(job.lengths, recipe.batch_tokens):
        batch = collate(columns[(idx + shard.start).tolist()])
        outs = teacher_outputs(model, batch, shard.view, list(recipe.layers), recipe.top_k, recipe.positions,
                               recipe.hidden_positions, rt, recipe.attention_for(shard))
        for j, o in zip(idx.tolist(), outs, strict=True):
            slots[j] = o
    record, counts = finish_shard(shard, slots, recipe, tconf)
    return record, {**counts, "device": str(rt.device), "precision": rt.precision}


def build_cache(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t_start = time.perf_counter()
    cc = cfg.cache
    saved = load_saved(ctx.upstream_dir("teacher"))
    tconf = saved.config
    layers = [] if cc.hidden_positions == "none" else resolve_layers(cc.hidden_layers, tconf.num_hidden_layers, cfg)
    soft = saved.has_mlm_head
    top_k = cc.top_k if soft else 0  # no MLM head: no soft labels, hidden states only
    if soft and cc.top_k > tconf.vocab_size:
        raise StageError(f"cache.top_k = {cc.top_k} is more than the teacher's vocabulary ({tconf.vocab_size}); "
                         f"at most {tconf.vocab_size} (which keeps the full distribution)")

    pairs_dir = ctx.upstream_dir("pairs")
    data = {split: pairs_output.load_split(pairs_dir, split, views=cc.views) for split in cc.splits}
    parts = {f"{split}/{view}": part_size(data[split], view, cc.positions, cc.hidden_positions,
                                          cc.examples_per_shard, soft)
             for split in cc.splits for view in cc.views}
    attention = resolve_attention_layers(cfg, tconf)
    estimate = cache_estimate(parts, top_k, tconf, layers, attention)
    attention_online = None  # why the requested attention maps are not cached (auto, over the budget)
    if attention and cc.attention_layers == "auto" and estimate["total"] > cc.max_bytes:
        without = cache_estimate(parts, top_k, tconf, layers, [])
        if without["total"] <= cc.max_bytes:
            attention_online = (f"the attention maps of teacher layers {attention} would take "
                                f"{_gb(estimate['attention'])}, which with the rest ({_gb(without['total'])}) is over "
                                f"cache.max_bytes ({_gb(cc.max_bytes)}): the DistilBERT stage computes them with the "
                                "teacher in its step")
            attention, estimate = [], without
    if estimate["total"] > cc.max_bytes:
        raise StageError(over_budget_message(cfg, estimate, parts, tconf, layers, attention))

    plan = [s for split in cc.splits for view in cc.views
            for s in plan_shards(split, view, len(data[split]), cc.examples_per_shard)]
    finished = keep_finished_shards(ctx, plan)
    atomic_write_json(ctx.out_dir / PROGRESS, {"shards": finished})
    todo = [s for s in plan if s.file not in finished]
    lengths = {(s, v): np.asarray(data[s][LENGTH_COLUMN[v]], dtype=np.int64) for s in cc.splits for v in cc.views}
    tokens = {s.file: int(lengths[s.split, s.view][s.start:s.stop].sum()) for s in plan}
    stats = {rel: {**shard_stats(ctx.out_dir / rel), "tokens": tokens[rel]} for rel in finished}

    recipe = CacheRecipe(ctx.upstream_dir("teacher"), pairs_dir, ctx.out_dir, tuple(cc.views), tuple(layers), top_k,
                         cc.positions, cc.hidden_positions, cc.batch_tokens, cc.precision, tuple(attention))
    compute_s, computed_tokens, device, precision = 0.0, 0, None, None
    if todo and ctx.shard_map is not None:  # e.g. Prefect tasks on a Dask cluster: each worker loads the teacher once
        t0 = time.perf_counter()
        jobs = [CacheJob(s, lengths[s.split, s.view][s.start:s.stop]) for s in todo]
        for shard, (record, counts) in zip(todo, ctx.shard_map(run_cache_shard, jobs, recipe), strict=True):
            device, precision = counts.pop("device"), counts.pop("precision")
            finished[shard.file], stats[shard.file] = record, {**counts, "tokens": tokens[shard.file]}
            computed_tokens += tokens[shard.file]
        atomic_write_json(ctx.out_dir / PROGRESS, {"shards": finished})
        compute_s = time.perf_counter() - t0
    elif todo:
        rt = engine.setup_runtime(cc.precision)
        device, precision = str(rt.device), rt.precision
        model = saved.load_model().to(rt.device)
        collate = view_collators(tconf, cc.views, rt)
        columns = {(s, v): data[s].select_columns(list(VIEW_COLUMNS[v][:4])) for s in cc.splits for v in cc.views}
        batches = {s.file: token_budget_batches(lengths[s.split, s.view][s.start:s.stop], cc.batch_tokens)
                   for s in todo}
        # (shard, rows of the split, last batch of the shard?) in shard order; a DataLoader fetches and
        # pads the next batches in worker processes while the GPU computes (in-line on a CPU).
        items = [(k, idx + s.start, b == len(batches[s.file]) - 1)
                 for k, s in enumerate(todo) for b, idx in enumerate(batches[s.file])]

        def fetch(item: tuple[int, np.ndarray, bool]) -> tuple[int, np.ndarray, bool, dict[str, torch.Tensor]]:
            k, rows, last = item
            shard = todo[k]
            return k, rows, last, collate[shard.view](columns[shard.split, shard.view][rows.tolist()])

        on_gpu = rt.device.type == "cuda"
        loader = torch.utils.data.DataLoader(items, batch_size=None, collate_fn=fetch, num_workers=2 if on_gpu else 0,
                                             pin_memory=on_gpu)
        slots: list[ExampleOutputs | None] = []
        t0 = time.perf_counter()
        for k, rows, last, batch in ctx.progress(loader, "teacher forward", total=len(items), unit="batch"):
            shard = todo[k]
            if not slots:
                slots = [None] * (shard.stop - shard.start)
            outs = teacher_outputs(model, batch, shard.view, layers, top_k, cc.positions, cc.hidden_positions, rt,
                                   recipe.attention_for(shard))
            for j, o in zip((rows - shard.start).tolist(), outs, strict=True):
                slots[j] = o
            if not last:
                continue
            finished[shard.file], shard_stats_ = finish_shard(shard, slots, recipe, tconf)
            atomic_write_json(ctx.out_dir / PROGRESS, {"shards": finished})
            stats[shard.file] = {**shard_stats_, "tokens": tokens[shard.file]}
            computed_tokens += stats[shard.file]["tokens"]
            compute_s = time.perf_counter() - t0
            slots = []
            done = len(stats)
            ctx.log_metrics({"cache_shards_done": done, "cache_tokens_per_s": computed_tokens / max(compute_s, 1e-9)},
                            done)

    manifest = cache_manifest(cfg, ctx, plan, finished, stats, layers, tconf, estimate, top_k, attention,
                              attention_online)
    atomic_write_json(ctx.out_dir / CACHE_MANIFEST, manifest)
    (ctx.out_dir / PROGRESS).unlink(missing_ok=True)  # cache_manifest.json now records every shard

    totals = manifest["totals"]
    reused = sum(1 for s in plan if "kept_from" in finished[s.file])
    counts = {
        "examples": totals["examples"], "tokens": totals["tokens"], "positions": totals["positions"],
        "hidden_positions": totals["hidden_positions"],
        "shards": len(plan), "shards_computed": len(plan) - reused, "shards_reused": reused,
        "bytes": totals["bytes"], "estimated_bytes": estimate["total"],
        "bytes_per_token": round(totals["bytes_per_token"], 2),
        "tokens_per_s": round(computed_tokens / compute_s, 1) if compute_s else 0.0,
        "mean_topk_mass": round(totals["mean_topk_mass"], 5),
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    return StageReport(
        counts=counts,
        inputs=[{"stage": name, "fingerprint": rec.fingerprint} for name, rec in ctx.upstream.items()],
        artifacts=[CACHE_MANIFEST],
        details={"layers": layers, "top_k": top_k, "positions": cc.positions,
                 "hidden_positions": cc.hidden_positions, "has_soft_labels": soft,
                 "soft_labels": f"top-{top_k} at the {cc.positions} positions" if soft
                 else f"none: the teacher has no MLM head (teacher.mlm_head: {saved.mlm_head}); hidden states only",
                 "attention_layers": attention,
                 **({"attention_online": attention_online} if attention_online else {}),
                 "estimate": estimate, "device": device, "precision": precision,
                 "kept_from": {rel: m["kept_from"] for rel, m in finished.items() if "kept_from" in m}},
    )


def cache_estimate(parts: dict[str, PartSize], top_k: int, tconf: BertConfig, layers: list[int],
                   attention: list[int]) -> dict[str, int]:
    return estimate_cache_bytes(parts, top_k, tconf.vocab_size, tconf.max_position_embeddings, tconf.hidden_size,
                                len(layers), tconf.num_attention_heads, len(attention), "/".join(ATTENTION_PART))


def cache_manifest(cfg: PipelineConfig, ctx: StageContext, plan: list[ShardPlan], files: dict[str, dict],
                   stats: dict[str, dict], layers: list[int], tconf: BertConfig,
                   estimate: dict[str, int], top_k: int, attention: list[int] = (),
                   attention_online: str | None = None) -> dict[str, Any]:
    cc = cfg.cache
    splits: dict[str, dict[str, Any]] = {}
    for s in plan:
        entry = splits.setdefault(s.split, {}).setdefault(s.view, {key: 0 for key in COUNTED} | {"shards": []})
        st = stats[s.file]
        for key in COUNTED:
            entry[key] += st[key]
        entry["shards"].append({"file": s.file, "first_example": s.start, **{key: st[key] for key in COUNTED},
                                "bytes": files[s.file]["size"], "sha256": files[s.file]["sha256"]})
    for split in cc.splits:  # a split with no examples still says so
        for view in cc.views:
            splits.setdefault(split, {}).setdefault(view, {key: 0 for key in COUNTED} | {"shards": []})
    k, h = top_k, tconf.hidden_size
    ids, pos = index_dtype(tconf.vocab_size).name, index_dtype(tconf.max_position_embeddings).name
    tensors = {"example_index": ("int64", ["examples"]), "pos_offsets": ("int64", ["examples + 1"]),
               "positions": (pos, ["positions"]), "topk_ids": (ids, ["positions", k]),
               "topk_logratio": ("uint8", ["positions", k]), "topk_mass": ("float16", ["positions"]),
               "hidden_offsets": ("int64", ["examples + 1"]), "hidden_positions": (pos, ["hidden_positions"])}
    for layer in layers:
        tensors[hidden_name(layer)] = ("int8", ["hidden_positions", h])
        tensors[scale_name(layer)] = ("float16", ["hidden_positions"])
    if attention:  # in the ATTENTION_PART shards only
        tensors["attention_offsets"] = ("int64", ["examples + 1"])
        for layer in attention:
            tensors[attention_name(layer)] = ("float16", ["sum of heads x n^2 over the examples"])
    tensors = {name: {"dtype": dtype, "shape": shape} for name, (dtype, shape) in tensors.items()}
    n_tokens = sum(st["tokens"] for st in stats.values())
    n_positions = sum(st["positions"] for st in stats.values())
    n_bytes = sum(files[s.file]["size"] for s in plan)
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "teacher": {"fingerprint": ctx.upstream["teacher"].fingerprint, "hidden_size": h,
                    "num_layers": tconf.num_hidden_layers, "vocab_size": tconf.vocab_size},
        "pairs": {"fingerprint": ctx.upstream["pairs"].fingerprint},
        "top_k": k, "positions": cc.positions, "hidden_positions": cc.hidden_positions, "layers": layers,
        "views": cc.views, "has_soft_labels": k > 0,
        "soft_labels": f"top-k ids and their log-probability ratio to the likeliest (full-vocabulary softmax at "
        f"temperature 1) in uint8 steps of 1/{LOGRATIO_STEPS_PER_NAT} nat" if k
        else "none: the teacher has no MLM head (hidden states only)",
        "hidden_states": "int8 rows with a float16 absmax scale per row" if layers else "none",
        "attention": {"split": ATTENTION_PART[0], "view": ATTENTION_PART[1], "layers": list(attention),
                      "heads": tconf.num_attention_heads,
                      "format": "float16 scores q.k/sqrt(d) between the real tokens, (heads, n, n) per example",
                      **({"online": attention_online} if attention_online else {})},
        "examples_per_shard": cc.examples_per_shard,
        "tensors": tensors,
        "splits": splits,
        "shard_files": {s.file: {"sha256": files[s.file]["sha256"], "size": files[s.file]["size"]} for s in plan},
        "totals": {"examples": sum(st["examples"] for st in stats.values()), "tokens": n_tokens,
                   "positions": n_positions, "hidden_positions": sum(st["hidden_positions"] for st in stats.values()),
                   "shards": len(plan), "bytes": n_bytes,
                   "estimated_bytes": estimate["total"],
                   "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
                   "mean_topk_mass": sum(st["mass_sum"] for st in stats.values()) / n_positions if n_positions else 0.0},
    }


