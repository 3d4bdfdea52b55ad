"""ALBERT's sharing modes at a preset's shape: parameters, on-disk size and training tokens/s.

    python benchmarks/albert.py [--preset cpu|gpu|smoke] [--steps N] [--examples N] [--set key=value ...]

For each sharing mode (all, attention, ffn, none) an ALBERT of the preset's albert shape (E, hidden,
layers, heads, FF; unset sizes = the teacher's) with the preset's vocabulary is built with
models.albert, saved with save_pretrained (model.safetensors bytes: what a user downloads; the
attention/ffn modes write their shared block once per layer so any ALBERT class can load them), and
trained through tasks/engine.py with the scratch loss (MLM at the labelled positions + SOP) on synthetic
SOP-view examples with the pairs stage's length profile, for N timed steps after a 3-step warm-up. A
BERT of the teacher's shape is timed the same way (MLM + NSP) as the reference.

Sharing saves parameters, not compute: every mode runs all L layers, so tokens/s stay close; the
factorised embedding (E < H) makes the embedding and the MLM head cheaper.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from teacher_cache import synthetic_pairs  # noqa: E402

from benchmarks.teacher_cache import print_machine  # noqa: E402
from models.albert import (  # noqa: E402
    SHARING_MODES,
    albert_config,
    albert_pretraining_loss,
    build_albert_for_pretraining,
    count_parameters,
)
from models.bert import bert_config, build_bert_for_pretraining, pretraining_loss  # noqa: E402
from tasks import albert as albert_stage  # noqa: E402
from tasks import engine  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.section import TrainingConfig
from tasks.teacher.build import pretraining_collator  # noqa: E402

DEFAULTS = {"cpu": {"examples": 1024, "steps": 10}, "gpu": {"examples": 32768, "steps": 40},
            "smoke": {"examples": 512, "steps": 10}}
PAD, CLS, SEP = 0, 2, 3
NSP_TO_SOP = {"input_ids": "sop_input_ids", "token_type_ids": "sop_token_type_ids",
              "attention_mask": "sop_attention_mask", "labels": "sop_labels",
              "next_sentence_label": "sentence_order_label", "length": "sop_length"}


def train_tokens_per_s(model, loss_fn, ds, batch_size: int, steps: int, collate, rt,
                       length_column: str) -> tuple[float, float | None]:
    """(tokens/s, mean MFU or None) of `steps` engine steps after a 3-step warm-up (not counted)."""
    cfg = TrainingConfig(max_steps=steps, batch_size=batch_size, effective_batch_size=batch_size, warmup_steps=1,
                         checkpoint_every=0, eval_every=0, log_every=max(1, steps // 5))
    engine.train(copy.deepcopy(model), loss_fn, ds, cfg.model_copy(update={"max_steps": 3}), collate, seed=1,
                 runtime=rt, length_column=length_column)
    mfu: list[float] = []
    result = engine.train(copy.deepcopy(model), loss_fn, ds, cfg, collate, seed=0, runtime=rt,
                          length_column=length_column,
                          metrics_sink=lambda m, s: mfu.append(m["mfu"]) if "mfu" in m else None)
    return result.tokens_per_s, (float(np.mean(mfu)) if mfu else None)


def main() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=tuple(DEFAULTS))
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per model")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg, preset = load_config(args.preset, overrides=["run.progress=false", *args.overrides])
    n = args.examples or DEFAULTS[preset]["examples"]
    steps = args.steps or DEFAULTS[preset]["steps"]
    t, a = cfg.teacher, cfg.albert
    vocab, seq = cfg.tokenizer.vocab_size, cfg.pairs.max_seq_len
    nsp = Dataset.from_dict(synthetic_pairs(n, seq, vocab))
    sop = nsp.rename_columns(NSP_TO_SOP)
    batch = a.train.batch_size
    rt = engine.setup_runtime(a.train.precision)
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"cpu x {torch.get_num_threads()}"
    hidden, heads = a.hidden_size or t.hidden_size, a.num_heads or t.num_heads
    layers, ff = a.num_layers or t.num_layers, a.intermediate_size or t.intermediate_size
    print(f"preset={preset}: ALBERT E={a.embedding_size}, hidden {hidden}, {layers} layers, {heads} heads, FF {ff}, "
          f"vocab {vocab:,}; batch {batch} x up to {seq} tokens, {steps} timed steps; {device}, {rt.precision}")
    print_machine(rt)

    rows = []
    with tempfile.TemporaryDirectory(prefix="lightbert-albert-bench-") as tmp:
        for mode in SHARING_MODES:
            config = albert_config(vocab, a.embedding_size, hidden, layers, heads, ff, t.max_position_embeddings,
                                   mode, PAD, CLS, SEP, a.dropout)
            torch.manual_seed(0)
            model = build_albert_for_pretraining(config)
            out = Path(tmp) / mode
            model.save_pretrained(out, safe_serialization=True)
            disk = (out / "model.safetensors").stat().st_size
            tok_s, mfu = train_tokens_per_s(model, albert_pretraining_loss, sop, batch, steps,
                                            albert_stage.RealTokenCount(albert_stage.sop_collator(PAD)), rt,
                                            "sop_length")
            rows.append((f"albert {mode}", count_parameters(model), count_parameters(model.albert), disk, tok_s, mfu))
        torch.manual_seed(0)
        bert = build_bert_for_pretraining(bert_config(vocab, t.hidden_size, t.num_layers, t.num_heads,
                                                      t.intermediate_size, t.max_position_embeddings, PAD))
        bert.save_pretrained(Path(tmp) / "bert", safe_serialization=True)
        disk = (Path(tmp) / "bert" / "model.safetensors").stat().st_size
        tok_s, mfu = train_tokens_per_s(bert, pretraining_loss, nsp, batch, steps,
                                        pretraining_collator(type("Tok", (), {"pad_token_id": PAD})()), rt, "length")
        rows.append(("bert (teacher shape)", count_parameters(bert), count_parameters(bert.bert), disk, tok_s, mfu))

    print(f"{'model':<22}{'parameters':>12}{'backbone':>12}{'on disk':>11}{'train tokens/s':>16}"
          + ("     MFU" if any(r[5] is not None for r in rows) else ""))
    for name, params, backbone, disk, tok_s, mfu in rows:
        print(f"{name:<22}{params / 1e6:>11.2f}M{backbone / 1e6:>11.2f}M{disk / 2**20:>8.1f} MiB{tok_s:>16,.0f}"
              + (f"{mfu:>8.1%}" if mfu is not None else ""))
    print("parameters: distinct tensors of the pretraining model (heads included); backbone: without the MLM/SOP "
          "heads, as the ALBERT paper counts; on disk: model.safetensors")


if __name__ == "__main__":
    main()
