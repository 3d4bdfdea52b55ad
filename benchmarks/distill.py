"""DistilBERT student training speed: the teacher's signal read from the cache vs the teacher run online.

    python benchmarks/distill.py [--preset cpu|gpu|smoke] [--examples N] [--steps N] [--set key=value ...]

A randomly initialised teacher of the preset's shape (weights do not change the cost) and N synthetic
pairs examples with the pairs stage's length profile (benchmarks/teacher_cache.py) go through the cache
stage (tasks.stage.run_stage: top-k soft labels at the masked positions and the last hidden layer). Then
the student of the preset's distilbert section is trained through tasks/engine.py with the triple loss
(tasks.distilbert.make_loss_fn), once from the cache (cache.top_k, default 64) and once with the teacher
in every step (its full distribution): student training tokens/s of each and their ratio, in one run.
On a GPU, MFU of the student's own FLOPs as well (the online teacher's forward is overhead, not counted).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from benchmarks.teacher_cache import PAD, print_machine, run_cache_stage, synthetic_pairs, timed_training  # noqa: E402
from models.bert import bert_config, build_bert_for_pretraining  # noqa: E402
from models.distilbert import build_student, init_student_from_teacher, resolve_layer_map  # noqa: E402
from tasks import engine  # noqa: E402
from tasks.cache.outputs import CachedPairs  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.distilbert import build as distilbert  # noqa: E402

DEFAULTS = {"cpu": {"examples": 1024, "steps": 15}, "gpu": {"examples": 32768, "steps": 60},
            "smoke": {"examples": 1024, "steps": 20}}


def main() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=tuple(DEFAULTS))
    ap.add_argument("--examples", type=int, default=None, help="synthetic pairs examples")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per path")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, preset = load_config(args.preset, overrides=[
        "run.progress=false", "cache.splits=[train]", "cache.views=[nsp]", "cache.max_bytes=1000000000000",
        *args.overrides])
    n = args.examples or DEFAULTS[preset]["examples"]
    steps = args.steps or DEFAULTS[preset]["steps"]
    t, d = cfg.teacher, cfg.distilbert
    vocab = cfg.tokenizer.vocab_size
    ds = Dataset.from_dict(synthetic_pairs(n, cfg.pairs.max_seq_len, vocab))
    torch.manual_seed(0)
    teacher = build_bert_for_pretraining(bert_config(vocab, t.hidden_size, t.num_layers, t.num_heads,
                                                     t.intermediate_size, t.max_position_embeddings, PAD, t.dropout))
    layer_map = resolve_layer_map(t.num_layers, d.num_layers, d.layer_map)
    student = build_student(teacher.config, len(layer_map), d.dropout)
    init_student_from_teacher(teacher, student, layer_map)
    rt = engine.setup_runtime(d.train.precision)
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"cpu x {torch.get_num_threads()}"
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    print(f"preset={preset}: teacher {t.num_layers} layers x {t.hidden_size} ({n_t / 1e6:.1f} M), student "
          f"{len(layer_map)} layers {layer_map} ({n_s / 1e6:.1f} M), vocab {vocab:,}, {n:,} synthetic examples "
          f"(max_seq_len {cfg.pairs.max_seq_len}); device {device}, {rt.precision}; batch {d.train.batch_size}, "
          f"{steps} timed steps per path; loss weights ce {d.alpha_ce} mlm {d.alpha_mlm} cos {d.alpha_cos}, "
          f"T {d.temperature}, cos_layers {d.cos_layers}")
    print_machine(rt)

    with tempfile.TemporaryDirectory(prefix="lightbert-distill-bench-") as tmp:
        root = Path(tmp)
        rec, seconds = run_cache_stage(teacher, ds, cfg, root)
        print(f"cache stage: {rec.manifest['counts']['tokens']:,} tokens in {seconds:.1f} s "
              f"(top_k {cfg.cache.top_k}, layers {rec.manifest['details']['layers']}; built once, read every epoch)")

        train_cfg = d.train.model_copy(update={"max_steps": steps, "warmup_steps": 1, "checkpoint_every": 0,
                                               "eval_every": 0, "log_every": max(1, steps // 5)})
        multiple = 8 if rt.device.type == "cuda" else 1
        pairs_ = distilbert.cos_layer_pairs(d.cos_layers, layer_map, t.num_layers)
        run = distilbert.configured_run(cfg)
        cached = CachedPairs(rec.dir, ds, "train", "nsp")
        cached_fn = distilbert.make_loss_fn(replace(run, mode="cached"), pairs_, cfg.cache.positions,
                                             hidden_positions=cfg.cache.hidden_positions)
        tok_cached, mfu_cached = timed_training(student, cached_fn, cached, cached.collator(PAD, multiple),
                                                train_cfg, rt)
        teacher.eval().to(rt.device)
        online_fn = distilbert.make_loss_fn(replace(run, mode="online"), pairs_, cfg.cache.positions, teacher,
                                             cfg.cache.hidden_positions)
        online_collate = engine.PadCollator(distilbert.TEACHER_INPUTS, {"input_ids": PAD, "labels": -100}, multiple)
        tok_online, mfu_online = timed_training(student, online_fn, ds, online_collate, train_cfg, rt)

    def mfu(x: float | None) -> str:
        return f", MFU {100 * x:.1f}%" if x is not None else ""

    print("\nstudent training, tokens/s (the engine's count of real tokens over training time):")
    print(f"  {'cached teacher (top-' + str(cfg.cache.top_k) + ' soft labels, hidden states read from the cache)':<72}"
          f"{tok_cached:>10,.0f}{mfu(mfu_cached)}")
    print(f"  {'online teacher (full forward and distribution in every step)':<72}{tok_online:>10,.0f}{mfu(mfu_online)}")
    print(f"  ratio cached / online: {tok_cached / tok_online:.2f}x")


if __name__ == "__main__":
    main()
