"""Teacher cache throughput, and what computing the vocabulary projection only at the loss positions buys.

    python benchmarks/teacher_cache.py [--preset cpu|gpu] [--examples N] [--steps N] [--pairs DIR]
                                       [--set key=value ...]

1. Cache: a randomly initialised teacher of the preset's shape (weights do not change the cost) runs
   the cache stage (tasks.stage.run_stage, no Prefect or MLflow) over N pairs examples: synthetic ones
   with the pairs stage's length profile, or the first N of a real pairs stage output (--pairs W/pairs;
   --examples 0 = all of it). Prints tokens/s, bytes per token, and the size estimate against the bytes.
2. Teacher training through tasks/engine.py on the same examples, with the MLM head at the labelled
   positions only (models.bert.pretraining_loss) vs at every position (full_position_loss): tokens/s of
   each and their ratio, in one run. On a GPU, MFU as well.

Needs only torch, transformers and datasets (and this repository's modules).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402

from models.bert import (  # noqa: E402
    IGNORE_INDEX,
    PRETRAINING_INPUTS,
    bert_config,
    build_bert_for_pretraining,
    full_position_loss,
    pretraining_loss,
)
from tasks import engine  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.pipeline import SPECS  # noqa: E402
from tasks.section import TrainingConfig
from tasks.stage import StageRecord, run_stage  # noqa: E402

DEFAULTS = {"cpu": {"examples": 2048, "steps": 20}, "gpu": {"examples": 65536, "steps": 60},
            "smoke": {"examples": 1024, "steps": 20}}
PAD, CLS, SEP, MASK, FIRST_WORD = 0, 2, 3, 4, 5


def synthetic_pairs(n: int, max_seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, list]:
    """NSP-view columns shaped like the pairs stage's: most sequences near max_seq_len (mean about 0.9
    of it), one in ten shorter; 15% of the non-special tokens labelled, 80% of those replaced by [MASK]."""
    rng = np.random.default_rng(seed)
    long = rng.integers(int(0.8 * max_seq_len), max_seq_len + 1, size=n)
    short = rng.integers(8, max_seq_len + 1, size=n)
    lengths = np.where(rng.random(n) < 0.9, long, short)
    cols: dict[str, list] = {k: [] for k in (*PRETRAINING_INPUTS, "length")}
    for length in lengths.tolist():
        split = int(rng.integers(2, length - 2))
        tokens = rng.integers(FIRST_WORD, vocab_size, size=length)
        tokens[[0, split, length - 1]] = (CLS, SEP, SEP)
        words = np.flatnonzero(tokens >= FIRST_WORD)
        chosen = rng.choice(words, size=max(1, round(0.15 * len(words))), replace=False)
        labels = np.full(length, IGNORE_INDEX)
        labels[chosen] = tokens[chosen]
        inputs = tokens.copy()
        inputs[chosen[rng.random(len(chosen)) < 0.8]] = MASK
        cols["input_ids"].append(inputs.tolist())
        cols["token_type_ids"].append([0] * (split + 1) + [1] * (length - split - 1))
        cols["attention_mask"].append([1] * length)
        cols["labels"].append(labels.tolist())
        cols["next_sentence_label"].append(int(rng.random() < 0.5))
        cols["length"].append(length)
    return cols


def timed_training(model, loss_fn, data, collate, cfg: TrainingConfig, rt) -> tuple[float, float | None]:
    """(tokens/s, mean MFU or None) of cfg.max_steps optimizer steps after a 3-step warm-up (not counted)."""
    engine.train(copy.deepcopy(model), loss_fn, data, cfg.model_copy(update={"max_steps": 3}), collate, seed=1,
                 runtime=rt)
    mfu: list[float] = []
    result = engine.train(copy.deepcopy(model), loss_fn, data, cfg, collate, seed=0, runtime=rt,
                          metrics_sink=lambda m, s: mfu.append(m["mfu"]) if "mfu" in m else None)
    return result.tokens_per_s, (float(np.mean(mfu)) if mfu else None)


def train_tokens_per_s(model, loss_fn, ds, batch_size: int, steps: int, collate, rt) -> tuple[float, float | None]:
    cfg = TrainingConfig(max_steps=steps, batch_size=batch_size, effective_batch_size=batch_size, warmup_steps=1,
                         checkpoint_every=0, eval_every=0, log_every=max(1, steps // 5))
    return timed_training(model, loss_fn, ds, collate, cfg, rt)


def print_machine(rt=None) -> None:
    """The machine's measured fp32 matmul speed (every time a benchmark prints is relative to it: machines
    that look alike differ by 2.5x), and a warning when other processes load the cores."""
    print(f"  machine: fp32 matmul {engine.matmul_gflops():.0f} GFLOP/s (2048x2048, {torch.get_num_threads()} "
          f"threads), {os.cpu_count()} cores")
    if (rt is None or rt.device.type == "cpu") and os.getloadavg()[0] > 0.5:
        print(f"  note: load average {os.getloadavg()[0]:.1f} before starting; other processes on these cores "
              "lower the CPU figures a lot (threads oversubscribed)")


def run_cache_stage(teacher, pairs_train, cfg, root: Path):
    """Run the real cache stage over `pairs_train` with `teacher` as its upstream; (record, seconds)."""
    teacher.save_pretrained(root / "teacher" / "model", safe_serialization=True)
    pairs_train.save_to_disk(str(root / "pairs" / "train"))
    upstream = {name: StageRecord(name, root / name, {"output_fingerprint": name}, False, "benchmark")
                for name in ("teacher", "pairs")}
    t0 = time.perf_counter()
    rec = run_stage(SPECS["cache"], cfg, root / "work", upstream)
    return rec, time.perf_counter() - t0


def main() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=tuple(DEFAULTS))
    ap.add_argument("--examples", type=int, default=None, help="pairs examples (0 = all of --pairs)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per loss")
    ap.add_argument("--pairs", type=Path, default=None, help="a pairs stage output (W/pairs) instead of synthetic")
    ap.add_argument("--skip-train", action="store_true", help="only the cache figures")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg, preset = load_config(args.preset, overrides=["run.progress=false", "cache.splits=[train]", "cache.views=[nsp]",
                                                      "cache.max_bytes=1000000000000", *args.overrides])
    n = DEFAULTS[preset]["examples"] if args.examples is None else args.examples
    steps = args.steps or DEFAULTS[preset]["steps"]
    t = cfg.teacher
    vocab = cfg.tokenizer.vocab_size
    if args.pairs is not None:
        ds = load_from_disk(str(args.pairs / "train"))
        vocab = max(vocab, int(max(max(r) for r in ds.select(range(min(len(ds), 2000)))["input_ids"])) + 1)
        ds = ds.select(range(min(n, len(ds)))) if n else ds
        source = f"{len(ds):,} examples of {args.pairs}/train"
    else:
        ds = Dataset.from_dict(synthetic_pairs(n, cfg.pairs.max_seq_len, vocab))
        source = f"{n:,} synthetic examples (max_seq_len {cfg.pairs.max_seq_len})"
    torch.manual_seed(0)
    model = build_bert_for_pretraining(bert_config(vocab, t.hidden_size, t.num_layers, t.num_heads,
                                                   t.intermediate_size, t.max_position_embeddings, PAD, t.dropout))
    rt = engine.setup_runtime(cfg.cache.precision)
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"cpu x {torch.get_num_threads()}"
    params = sum(p.numel() for p in model.parameters())
    print(f"preset={preset} teacher: {t.num_layers} layers, hidden {t.hidden_size}, vocab {vocab:,}, "
          f"{params / 1e6:.1f} M parameters; device {device}, {rt.precision}; data: {source}")
    print_machine(rt)

    with tempfile.TemporaryDirectory(prefix="lightbert-cache-bench-") as tmp:
        root = Path(tmp)
        rec, wall = run_cache_stage(model, ds, cfg, root)
        c = rec.manifest["counts"]
        cc = cfg.cache
        print(f"\ncache (top_k {cc.top_k}, positions {cc.positions}, layers {rec.manifest['details']['layers']}, "
              f"batch_tokens {cc.batch_tokens:,}, {c['shards']} shard(s)):")
        print(f"  {c['tokens']:,} tokens, {c['positions']:,} soft-label positions in {wall:.1f} s (stage wall)")
        print(f"  throughput      {c['tokens_per_s']:,.0f} tokens/s (teacher forward + top-k + writing shards)")
        print(f"  bytes per token {c['bytes_per_token']:,.1f}  ({c['bytes'] / 1e6:,.1f} MB; estimate before "
              f"writing {c['estimated_bytes'] / 1e6:,.1f} MB, {100 * (c['estimated_bytes'] / c['bytes'] - 1):+.2f}%)")
        print(f"  mean top-{cc.top_k} probability mass {c['mean_topk_mass']:.4f} (random teacher: low by nature)")
        peak = engine.gpu_peak_flops(rt.device)
        if peak is not None:
            seq = c["tokens"] / max(c["examples"], 1)
            forward = engine.model_flops_per_token(model, seq) / 3  # forward only: a third of training's 6N
            print(f"  MFU (forward)   {forward * c['tokens_per_s'] / peak:.1%}")

    if args.skip_train:
        return
    train_ds = ds.select_columns([*PRETRAINING_INPUTS, "length"])
    collate = engine.PadCollator(PRETRAINING_INPUTS, {"input_ids": PAD, "labels": IGNORE_INDEX},
                                 8 if rt.device.type == "cuda" else 1)
    bs = t.train.batch_size
    print(f"\nteacher training, {steps} steps of {bs} examples after a 3-step warm-up, {rt.precision}:")
    fast, fast_mfu = train_tokens_per_s(model, pretraining_loss, train_ds, bs, steps, collate, rt)
    full, full_mfu = train_tokens_per_s(model, full_position_loss, train_ds, bs, steps, collate, rt)
    for name, rate, mfu in (("MLM head at the loss positions only", fast, fast_mfu),
                            ("MLM head at every position (HF)   ", full, full_mfu)):
        print(f"  {name} {rate:10,.0f} tokens/s" + (f"   MFU {mfu:.1%}" if mfu is not None else ""))
    print(f"  ratio (loss positions only / every position): {fast / full:.2f}x")


if __name__ == "__main__":
    main()
