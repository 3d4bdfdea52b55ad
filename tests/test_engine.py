"""tasks/engine.py: data order, accumulation, checkpoints that load with weights_only, and a kill -9
in the middle of training that resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from models.bert import (
    IGNORE_INDEX,
    PRETRAINING_INPUTS,
    bert_config,
    build_bert_for_pretraining,
    pretraining_forward,
    pretraining_loss,
)
from tasks import engine
from tasks.section import TrainingConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 48
PAD, CLS, SEP, MASK = 0, 2, 3, 4
COLLATE = engine.PadCollator(PRETRAINING_INPUTS, {"input_ids": PAD, "labels": IGNORE_INDEX})


def random_pairs(n: int, seed: int = 0, min_len: int = 8, max_len: int = 24, n_masked: int | None = None) -> Dataset:
    """Pairs-stage-shaped rows: [CLS] A [SEP] B [SEP] with ids that repeat a short per-row motif (so
    there is something to learn); n_masked fixes the number of labelled positions per row."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in (*PRETRAINING_INPUTS, "length")}
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        motif = rng.integers(5, VOCAB, size=3)
        body = [int(motif[i % 3]) for i in range(length - 3)]
        cut = len(body) // 2
        ids = [CLS, *body[:cut], SEP, *body[cut:], SEP]
        types = [0] * (cut + 2) + [1] * (length - cut - 2)
        candidates = [i for i, t in enumerate(ids) if t > MASK]
        k = n_masked or max(1, round(0.15 * len(candidates)))
        chosen = set(rng.choice(candidates, size=k, replace=False).tolist())
        rows["labels"].append([t if i in chosen else IGNORE_INDEX for i, t in enumerate(ids)])
        rows["input_ids"].append([MASK if i in chosen else t for i, t in enumerate(ids)])
        rows["token_type_ids"].append(types)
        rows["attention_mask"].append([1] * length)
        rows["next_sentence_label"].append(int(rng.integers(0, 2)))
        rows["length"].append(length)
    return Dataset.from_dict(rows)


def tiny_bert(seed: int = 0, dropout: float = 0.1):
    torch.manual_seed(seed)
    return build_bert_for_pretraining(bert_config(VOCAB, 32, 2, 2, 64, 64, pad_token_id=PAD, dropout=dropout))


def tiny_train_config(**overrides) -> TrainingConfig:
    base = dict(max_steps=12, batch_size=8, effective_batch_size=8, learning_rate=3e-3, warmup_steps=2,
                checkpoint_every=0, eval_every=0, log_every=1, precision="fp32")
    return TrainingConfig(**(base | overrides))


def run_tiny_training(checkpoint_dir: Path | None, max_steps: int = 12, kill_after: int | None = None,
                      checkpoint_every: int = 3) -> dict[str, torch.Tensor]:
    """The run the kill test repeats in subprocesses: dropout on, so RNG restoring matters too."""
    model = tiny_bert(dropout=0.1)

    def sink(metrics: dict[str, float], step: int | None) -> None:
        if kill_after is not None and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, at a known point

    cfg = tiny_train_config(max_steps=max_steps, checkpoint_every=checkpoint_every, batch_size=4,
                            effective_batch_size=8)
    engine.train(model, pretraining_loss, random_pairs(96, seed=1), cfg, COLLATE, seed=5,
                 checkpoint_dir=checkpoint_dir, metrics_sink=sink)
    return model.state_dict()


# ------------------------------------------------------------------------------------------------
def test_batches_are_a_pure_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(5, 100, size=1000)
    a = engine.length_bucketed_batches(lengths, 16, seed=3, epoch=0, chunk_batches=8)
    b = engine.length_bucketed_batches(lengths, 16, seed=3, epoch=0, chunk_batches=8)
    c = engine.length_bucketed_batches(lengths, 16, seed=3, epoch=1, chunk_batches=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))  # every example once per epoch
    # bucketing: a batch spans a much smaller range of lengths than a random batch would
    spread = np.mean([np.ptp(lengths[x]) for x in a])
    assert spread < 0.25 * np.ptp(lengths)
    # the stream resumes at an exact position, across the epoch boundary
    stream = engine.micro_batches(lengths, 16, seed=3)
    seq = [next(stream) for _ in range(len(a) + 5)]
    resumed = engine.micro_batches(lengths, 16, seed=3, start=seq[len(a) + 1][0])
    assert np.array_equal(next(resumed)[1], seq[len(a) + 2][1])


def test_collator_pads_per_batch():
    ds = random_pairs(4, min_len=6, max_len=12)
    batch = COLLATE(ds[[0, 1, 2, 3]])
    width = max(ds["length"])
    assert batch["input_ids"].shape == (4, width) and batch["next_sentence_label"].shape == (4,)
    short = int(np.argmin(ds["length"]))
    assert batch["labels"][short, -1] == IGNORE_INDEX and batch["attention_mask"][short, -1] == 0


def test_loss_goes_down_and_metrics_reach_the_sink():
    logged: list[tuple[dict, int]] = []
    model = tiny_bert(dropout=0.0)
    cfg = tiny_train_config(max_steps=40, log_every=5, learning_rate=1e-2)
    result = engine.train(model, pretraining_loss, random_pairs(16), cfg, COLLATE, seed=0,
                          metrics_sink=lambda m, s: logged.append((m, s)), eval_fn=lambda m, rt: {"val_probe": 1.0})
    first, last = logged[0][0], [m for m, _ in logged if "train_loss" in m][-1]
    assert last["train_loss"] < 0.6 * first["train_loss"], (first, last)  # 16 rows: it memorises them
    for key in ("train_loss", "train_mlm_loss", "train_nsp_loss", "train_grad_norm", "learning_rate",
                "tokens_per_s"):
        assert key in first
    assert "mfu" not in first  # no GPU, no MFU
    assert result.steps == 40 and result.tokens_seen > 0 and result.eval_metrics == {"val_probe": 1.0}
    assert result.runtime.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert logged[-1] == ({"val_probe": 1.0}, 40)


def test_gradient_accumulation_matches_one_big_batch():
    # equal lengths and equal masked counts per row: 8 x 1 and 4 x 2 see the same 8 rows in the step
    # (AdamW's first step hardly depends on the gradient's scale, so the gradients are compared too:
    # captured by a global optimizer pre-step hook at the moment the engine steps)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    data = random_pairs(8, seed=2, min_len=16, max_len=16, n_masked=3)
    weights, grads, losses = [], [], []
    for batch_size in (8, 4):
        model = tiny_bert(dropout=0.0)
        hook = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs, m=model: grads.append({n: p.grad.clone() for n, p in m.named_parameters()}))
        try:
            engine.train(model, pretraining_loss, data, tiny_train_config(max_steps=1, warmup_steps=0, max_grad_norm=None,
                         batch_size=batch_size, effective_batch_size=8), COLLATE, seed=0,
                         metrics_sink=lambda m, s: losses.append(m["train_loss"]))
        finally:
            hook.remove()
        weights.append(model.state_dict())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name
    untouched = tiny_bert(dropout=0.0).state_dict()
    assert not torch.equal(weights[0]["bert.encoder.layer.0.attention.self.query.weight"],
                           untouched["bert.encoder.layer.0.attention.self.query.weight"])
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-6), name


def test_weight_decay_skips_biases_and_layernorm():
    opt = engine.make_optimizer(tiny_bert(), tiny_train_config(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


def test_checkpoint_loads_with_weights_only(tmp_path: Path):
    run_tiny_training(tmp_path, max_steps=4, checkpoint_every=2)
    path = tmp_path / engine.CHECKPOINT
    state = torch.load(path, weights_only=True)  # raises on any pickled object
    assert state["step"] == 4 and set(state) >= {"model", "optimizer", "scheduler", "rng", "position", "tokens_seen"}
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left beside it


def test_kill_9_mid_training_resumes_to_the_same_weights(tmp_path: Path):
    reference = run_tiny_training(None, max_steps=12)
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_engine import run_tiny_training
        kill_after = int(sys.argv[1]) if len(sys.argv) > 1 else None
        state = run_tiny_training({str(ckpt)!r}, max_steps=12, kill_after=kill_after)
        torch.save(state, {str(tmp_path / "final.pt")!r})
    """)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run([sys.executable, "-c", script, "7"], cwd=root, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert engine.load_checkpoint(ckpt / engine.CHECKPOINT)["step"] == 6  # the last checkpoint before the kill
    resumed = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert engine.load_checkpoint(ckpt / engine.CHECKPOINT)["step"] == 12
    for name, tensor in reference.items():
        assert torch.allclose(tensor, final[name], atol=1e-5), name


def test_effective_batch_must_divide(tmp_path: Path):
    with pytest.raises(ValueError, match="multiple of batch_size"):
        TrainingConfig(batch_size=8, effective_batch_size=12)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_bert(dropout=0.0)
    cfg = tiny_train_config(max_steps=3, batch_size=4, effective_batch_size=8, checkpoint_every=2)
    engine.train(model, pretraining_loss, random_pairs(48, seed=1), cfg, COLLATE, seed=5,
                 checkpoint_dir=Path(out) / f"ckpt{rank}")
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_with_accumulation(tmp_path: Path):
    """2 gloo processes x batch 4 == 1 process x batch 4 x accumulation 2: each rank takes every other
    micro-batch of the same stream, and DDP averages what accumulation would have summed / 2."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = tiny_bert(dropout=0.0)
    engine.train(single, pretraining_loss, random_pairs(48, seed=1),
                 tiny_train_config(max_steps=3, batch_size=4, effective_batch_size=8), COLLATE, seed=5)
    for name, tensor in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(tensor, ranks[0][name], atol=1e-5), name
    assert (tmp_path / "ckpt0" / engine.CHECKPOINT).is_file()
    assert not (tmp_path / "ckpt1").exists()  # only rank 0 writes


def _sharded_eval_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from tasks import scoring

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rt = engine.setup_runtime("fp32")
    model = tiny_bert(dropout=0.0)
    seen: list[int] = []

    def predict(batch):
        seen.append(len(batch["input_ids"]))
        out_ = pretraining_forward(model, batch)
        return out_.mlm_logits, out_.mlm_labels, out_.nsp_logits

    totals = scoring.score_pretraining(model, predict, random_pairs(40, seed=3), COLLATE, 8, rt,
                                       pair_label="next_sentence_label")
    Path(out, f"eval{rank}.json").write_text(json.dumps({"totals": vars(totals), "rows": sum(seen)}))
    dist.destroy_process_group()


def test_evaluation_is_sharded_across_ranks_and_all_reduced(tmp_path: Path):
    """Under DDP every rank scores its share of the validation batches (none waits for rank 0 to score all
    of them), and the all-reduced sums equal one process scoring everything."""
    import json

    import torch.multiprocessing as mp

    from tasks import scoring

    mp.spawn(_sharded_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(2)]
    model = tiny_bert(dropout=0.0)

    def predict(batch):
        out_ = pretraining_forward(model, batch)
        return out_.mlm_logits, out_.mlm_labels, out_.nsp_logits

    single = scoring.score_pretraining(model, predict, random_pairs(40, seed=3), COLLATE, 8,
                                       engine.setup_runtime("fp32"), pair_label="next_sentence_label")
    assert ranks[0]["rows"] + ranks[1]["rows"] == 40 and 0 < ranks[0]["rows"] < 40  # each scored a share
    for r in ranks:
        for key in ("masked", "correct", "pairs", "pair_correct", "positive"):
            assert r["totals"][key] == getattr(single, key), key
        assert r["totals"]["ce"] == pytest.approx(single.ce, rel=1e-6)


def test_counted_flops_see_shared_layers_and_loss_positions_only():
    """MFU's FLOPs are counted as run: an ALBERT whose one layer is applied 4 times costs as much as one
    with 4 separate layers (the 6N estimate would call it about 4x cheaper in its layers), and the
    vocabulary projection costs in proportion to the masked positions, not to every token."""
    from models.albert import albert_config, build_albert_for_pretraining

    def albert(sharing: str):
        torch.manual_seed(0)
        conf = albert_config(VOCAB, 16, 64, 4, 2, 128, 64, sharing=sharing, pad_token_id=PAD, bos_token_id=CLS,
                             eos_token_id=SEP, dropout=0.0)
        return build_albert_for_pretraining(conf)

    def flops(model, data) -> int:
        collate = engine.PadCollator(PRETRAINING_INPUTS, {"input_ids": PAD, "labels": IGNORE_INDEX})
        batch = collate(data[list(range(len(data)))])

        def step():
            out = pretraining_forward(model, batch) if hasattr(model, "cls") else None
            loss = out.mlm_logits.sum() if out is not None else model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).prediction_logits.sum()
            loss.backward()
            return loss

        return engine.counted_flops(step)[0]

    data = random_pairs(8, seed=2, min_len=24, max_len=24)
    shared, separate = albert("all"), albert("none")
    assert flops(shared, data) == flops(separate, data)
    assert engine.model_flops_per_token(shared, 24) < 0.7 * engine.model_flops_per_token(separate, 24)
    few, many = random_pairs(8, seed=2, min_len=24, max_len=24, n_masked=2), random_pairs(8, seed=2, min_len=24,
                                                                                        max_len=24, n_masked=10)
    bert = tiny_bert(dropout=0.0)
    extra = flops(bert, many) - flops(bert, few)
    decoder = 6 * 32 * VOCAB  # forward + backward of the vocabulary projection, per masked row
    assert extra >= 8 * 8 * decoder  # 8 rows x 8 more masked positions, each at least through the decoder


def test_dataloader_workers_feed_the_same_batches_as_the_loop(tmp_path: Path):
    """With training.num_workers, batches are read and collated ahead in worker processes (the GPU's data
    path); the loop still sees exactly its own sequence, so the weights equal those of collating in the
    loop, also across a resume from a checkpoint."""
    data = random_pairs(96, seed=1)

    def run(workers: int, max_steps: int, ckpt: Path | None) -> dict[str, torch.Tensor]:
        model = tiny_bert(dropout=0.1)
        cfg = tiny_train_config(max_steps=max_steps, batch_size=4, effective_batch_size=8, checkpoint_every=3,
                                num_workers=workers, prefetch_factor=2)
        engine.train(model, pretraining_loss, data, cfg, COLLATE, seed=5, checkpoint_dir=ckpt)
        return model.state_dict()

    inline = run(0, 10, None)
    workers = run(2, 10, None)
    for name, tensor in inline.items():
        assert torch.equal(tensor, workers[name]), name

    class Interrupted(Exception):
        pass

    def stop_at_7(metrics: dict[str, float], step: int | None) -> None:
        if step == 7:
            raise Interrupted

    model = tiny_bert(dropout=0.1)
    cfg = tiny_train_config(max_steps=10, batch_size=4, effective_batch_size=8, checkpoint_every=3, num_workers=2,
                            prefetch_factor=2)
    with pytest.raises(Interrupted):  # after the step-6 checkpoint, with the workers ahead of the loop
        engine.train(model, pretraining_loss, data, cfg, COLLATE, seed=5, checkpoint_dir=tmp_path / "ckpt",
                     metrics_sink=stop_at_7)
    resumed = run(2, 10, tmp_path / "ckpt")
    for name, tensor in inline.items():
        assert torch.equal(tensor, resumed[name]), name


def test_sharded_data_is_batched_a_few_shards_at_a_time():
    """Data stored in shards (the teacher cache) is read in shard order: the epoch visits the shards in a
    random order, a buffer of SHARD_BUFFER at a time, so the reads stay within a few open shards; every
    example still comes once per epoch, and the batches are still length-bucketed and shuffled."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 64, size=1000)
    starts = np.arange(0, 1000, 50)  # 20 shards of 50 examples
    batches = engine.length_bucketed_batches(lengths, 16, seed=3, epoch=0, chunk_batches=4, shard_starts=starts)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    blocks: list[set[int]] = [set()]
    for batch in batches:
        shards = set((batch // 50).tolist())
        if len(blocks[-1] | shards) > engine.SHARD_BUFFER:
            blocks.append(set())
        blocks[-1] |= shards
    assert len(blocks) == 20 // engine.SHARD_BUFFER  # each buffer of shards is read once, then left
    assert set().union(*blocks) == set(range(20)) and sum(map(len, blocks)) == 20
    again = engine.length_bucketed_batches(lengths, 16, seed=3, epoch=1, chunk_batches=4, shard_starts=starts)
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # another order each epoch
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 0.5 * (lengths.max() - lengths.min())  # still bucketed by length
