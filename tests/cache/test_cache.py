"""tasks/cache/ and tasks/cache/outputs.py through tasks.stage.run_stage, on a hand-made teacher (a tiny
BertForPreTraining saved with save_pretrained) and hand-made pairs in the pairs schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_pairs

from models.bert import bert_config, build_bert_for_pretraining
from tasks import engine
from tasks.artifacts import hash_tree, sha256_json
from tasks.cache import build as cache
from tasks.cache.outputs import CACHE_MANIFEST, CachedPairs, soft_targets
from tasks.config import ConfigError
from tasks.pairs.outputs import load_split
from tasks.pipeline import SPECS
from tasks.section import TrainingConfig
from tasks.stage import PARTIAL, StageError, StageRecord, run_stage

REPO = Path(__file__).resolve().parents[2]
VOCAB, HIDDEN, LAYERS = 50, 32, 2
PAD, CLS, SEP, MASK = 0, 2, 3, 4
SMALL = ("cache.top_k=8", "cache.examples_per_shard=16", "cache.batch_tokens=256", "cache.views=[nsp]",
         "albert.variants=[scratch]")  # ALBERT-distilled would need the sop view cached


def record(name: str, root: Path) -> StageRecord:
    return StageRecord(name, root, {"output_fingerprint": sha256_json(hash_tree(root))}, cached=False,
                       reason="made by the test")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, StageRecord]:
    root = tmp_path_factory.mktemp("up")
    torch.manual_seed(0)
    teacher = build_bert_for_pretraining(bert_config(VOCAB, HIDDEN, LAYERS, 2, 64, 64, pad_token_id=PAD, dropout=0.0))
    teacher.save_pretrained(root / "teacher" / "model", safe_serialization=True)
    for split, n, seed in (("train", 70, 0), ("validation", 20, 1)):
        write_pairs(root / "pairs" / split, n, seed, VOCAB, CLS, SEP, MASK)
    return {"teacher": record("teacher", root / "teacher"), "pairs": record("pairs", root / "pairs")}


def fresh_teacher(upstream):
    from transformers import BertForPreTraining

    return BertForPreTraining.from_pretrained(upstream["teacher"].dir / "model").eval()


def padded_examples(lengths: np.ndarray, batch_tokens: int, shard_size: int, count: int) -> list[int]:
    """Examples that share their inference batch with a longer one (so they were padded)."""
    found = []
    for start in range(0, len(lengths), shard_size):
        for idx in cache.token_budget_batches(lengths[start:start + shard_size], batch_tokens):
            if lengths[start + idx[-1]] < lengths[start + idx[0]]:
                found.append(start + int(idx[-1]))
    assert len(found) >= count
    return found[:count]


@pytest.mark.parametrize("positions,layers,views", [("masked", "last", "[nsp,sop]"), ("all", "[0,1,2]", "[nsp]")])
def test_cached_outputs_equal_a_fresh_teacher_forward(make_config, workdir, upstream, positions, layers, views):
    top_k = 8 if positions == "masked" else VOCAB  # k = vocabulary: the full distribution
    cfg = make_config(*SMALL, f"cache.top_k={top_k}", f"cache.positions={positions}",
                      f"cache.hidden_layers={layers}", f"cache.views={views}")
    rec = run_stage(SPECS["cache"], cfg, workdir, upstream)
    counts = rec.manifest["counts"]
    want_layers = [LAYERS] if layers == "last" else [0, 1, 2]
    n_views = 2 if "sop" in views else 1
    assert counts["examples"] == (70 + 20) * n_views
    assert counts["shards"] == counts["shards_computed"] == (5 + 2) * n_views and counts["shards_reused"] == 0
    manifest = json.loads((rec.dir / CACHE_MANIFEST).read_text())
    assert manifest["layers"] == want_layers and manifest["top_k"] == top_k
    assert manifest["teacher"]["fingerprint"] == upstream["teacher"].fingerprint
    assert manifest["pairs"]["fingerprint"] == upstream["pairs"].fingerprint
    for rel, meta in manifest["shard_files"].items():  # the manifest's checksums are the files'
        assert rec.manifest["files"][rel]["sha256"] == meta["sha256"]

    model = fresh_teacher(upstream)
    for view, cols in (("nsp", ("input_ids", "token_type_ids", "attention_mask", "labels")),
                       ("sop", ("sop_input_ids", "sop_token_type_ids", "sop_attention_mask", "sop_labels"))):
        if view not in views:
            continue
        pairs = load_split(upstream["pairs"].dir, "train")
        loader = CachedPairs(rec.dir, pairs, "train", view)
        lengths = np.asarray(pairs["length" if view == "nsp" else "sop_length"])
        chosen = padded_examples(lengths, 256, 16, 4) + [int(np.argmin(lengths)), 3]  # 3: no masked position
        for i in chosen:
            row = loader[i]
            ids, types, attn, labels = (torch.tensor([pairs[i][c]]) for c in cols)
            with torch.no_grad():  # HF's own forward: logits at every position, one unpadded example
                out = model(input_ids=ids, token_type_ids=types, attention_mask=attn, output_hidden_states=True)
            where = (labels[0] != -100) if positions == "masked" else attn[0].bool()
            probs = out.prediction_logits[0][where].softmax(-1)
            top = probs.topk(top_k, dim=-1)
            assert row["teacher_positions"].tolist() == where.nonzero()[:, 0].tolist()
            assert np.array_equal(row["teacher_topk_ids"], top.indices.numpy())
            np.testing.assert_allclose(row["teacher_topk_probs"], top.values.numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(row["teacher_topk_mass"], top.values.sum(-1).numpy(), atol=1e-5)
            for layer in want_layers:
                stored = row[f"teacher_hidden_{layer}"]
                assert stored.dtype == np.float16 and stored.shape == (len(ids[0]), HIDDEN)
                torch.testing.assert_close(torch.from_numpy(stored).float(), out.hidden_states[layer][0],
                                           rtol=1e-3, atol=2e-3)
            if top_k == VOCAB and where.any():  # softened over the full support = softmax(z / T)
                np.testing.assert_allclose(row["teacher_topk_mass"], 1.0, atol=1e-5)
                scattered = torch.zeros(int(where.sum()), VOCAB).scatter_(
                    1, torch.from_numpy(row["teacher_topk_ids"]).long(),
                    soft_targets(torch.from_numpy(row["teacher_topk_probs"]), 2.0))
                torch.testing.assert_close(scattered, (out.prediction_logits[0][where] / 2.0).softmax(-1),
                                           atol=1e-5, rtol=1e-4)

        # a collated batch lines up with the padded input
        collate = loader.collator(PAD)
        batch = collate(loader[chosen])
        mask = batch["teacher_position_mask"]
        expect = (batch[cols[3]] != -100) if positions == "masked" else batch[cols[2]].bool()
        assert torch.equal(mask, expect)
        assert torch.equal(batch["teacher_topk_ids"], torch.from_numpy(
            np.concatenate([loader[i]["teacher_topk_ids"] for i in chosen])).long())
        hidden = batch[f"teacher_hidden_{want_layers[-1]}"]
        assert hidden.shape[:2] == batch[cols[0]].shape and hidden.dtype == torch.float16
        assert not hidden[~batch[cols[2]].bool()].any()  # zeros at padding


def test_budget_refuses_an_over_large_cache_with_the_estimate(make_config, workdir, upstream):
    cfg = make_config(*SMALL, "cache.max_bytes=50000")
    with pytest.raises(StageError) as err:
        run_stage(SPECS["cache"], cfg, workdir, upstream)
    message = str(err.value)
    assert "estimated" in message and "cache.max_bytes = " in message and "50,000 bytes" in message
    for setting in ("cache.top_k", "cache.hidden_layers", "pairs.dupe_factor", "cache.max_bytes"):
        assert setting in message
    assert not list(workdir.rglob("*.safetensors"))  # refused before anything was written
    estimate = int(message.split("(")[1].split(" bytes")[0].replace(",", ""))

    rec = run_stage(SPECS["cache"], make_config(*SMALL), workdir, upstream)
    counts = rec.manifest["counts"]
    assert counts["estimated_bytes"] == estimate
    assert abs(counts["bytes"] - estimate) / counts["bytes"] < 0.02, (counts["bytes"], estimate)
    assert counts["bytes_per_token"] > HIDDEN * 2  # the fp16 hidden state, plus soft labels and offsets
    assert 0.0 < counts["mean_topk_mass"] <= 1.0 and counts["tokens_per_s"] > 0


def test_corrupted_shard_is_detected_and_recomputed(make_config, workdir, upstream):
    cfg = make_config(*SMALL)
    first = run_stage(SPECS["cache"], cfg, workdir, upstream)
    shards = json.loads((first.dir / CACHE_MANIFEST).read_text())["shard_files"]
    victim = "train/nsp/shard-00001.safetensors"
    path = first.dir / victim
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the hidden states, same size
    path.write_bytes(bytes(data))
    inode_other = (first.dir / "train/nsp/shard-00000.safetensors").stat().st_ino

    second = run_stage(SPECS["cache"], cfg, workdir, upstream)
    assert not second.cached and "does not match its sha256" in second.reason
    counts = second.manifest["counts"]
    assert counts["shards_computed"] == 1 and counts["shards_reused"] == len(shards) - 1
    assert second.manifest["details"]["kept_from"].keys() == set(shards) - {victim}
    assert json.loads((second.dir / CACHE_MANIFEST).read_text())["shard_files"] == shards  # same bytes again
    assert (second.dir / "train/nsp/shard-00000.safetensors").stat().st_ino == inode_other  # linked, not rewritten
    assert run_stage(SPECS["cache"], cfg, workdir, upstream).cached


def test_interrupted_stage_recomputes_a_damaged_finished_shard(make_config, workdir, upstream):
    cfg = make_config(*SMALL)

    def interrupt(metrics: dict, step: int | None) -> None:
        if metrics["cache_shards_done"] == 3:
            raise KeyboardInterrupt  # as a Ctrl-C after the third shard

    with pytest.raises(KeyboardInterrupt):
        run_stage(SPECS["cache"], cfg, workdir, upstream, metrics_sink=interrupt)
    partial = next((workdir / PARTIAL).glob("cache-*"))
    damaged = partial / "train/nsp/shard-00000.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])  # truncated
    rec = run_stage(SPECS["cache"], cfg, workdir, upstream)
    counts = rec.manifest["counts"]
    assert rec.manifest["resumed"] and counts["shards_reused"] == 2 and counts["shards_computed"] == 5


KILL_SCRIPT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tasks.config import load_config
from tasks.pipeline import SPECS
from tasks.stage import StageRecord, run_stage
cfg, _ = load_config("smoke", overrides=json.loads(sys.argv[1]))
upstream = {{n: StageRecord(n, Path(d), {{"output_fingerprint": fp}}, False, "test")
            for n, (d, fp) in json.loads(sys.argv[2]).items()}}
# the sink paces the stage (half a second after each finished shard) so the test can kill it mid-way
run_stage(SPECS["cache"], cfg, Path(sys.argv[3]), upstream, metrics_sink=lambda m, s: time.sleep(0.5))
"""


def test_killed_stage_resumes_without_redoing_finished_shards(make_config, workdir, upstream, tmp_path):
    overrides = ["run.progress=false", *SMALL]
    script = tmp_path / "run_cache.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    up = json.dumps({n: [str(r.dir), r.fingerprint] for n, r in upstream.items()})
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), up, str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done: dict = {}
    deadline = time.monotonic() + 90
    while not done and time.monotonic() < deadline and proc.poll() is None:
        progress = list((workdir / PARTIAL).glob(f"cache-*/{cache.PROGRESS}"))
        if progress:
            done = json.loads(progress[0].read_text()).get("shards", {})
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert done, f"no shard finished before the kill: {stderr.decode()[-2000:]}"
    assert not (workdir / "cache").exists()
    partial = progress[0].parent
    before = {rel: ((partial / rel).stat().st_ino, (partial / rel).stat().st_mtime_ns) for rel in done}

    rec = run_stage(SPECS["cache"], make_config(*SMALL), workdir, upstream)
    counts = rec.manifest["counts"]
    assert rec.manifest["resumed"]
    assert counts["shards_reused"] == len(done) and counts["shards_computed"] == counts["shards"] - len(done)
    after = {rel: ((rec.dir / rel).stat().st_ino, (rec.dir / rel).stat().st_mtime_ns) for rel in done}
    assert after == before  # the very files written before the kill

    # the same bytes as an uninterrupted run
    fresh = run_stage(SPECS["cache"], make_config(*SMALL), workdir.parent / "uninterrupted", upstream)
    assert fresh.manifest["counts"]["shards_reused"] == 0
    assert (json.loads((fresh.dir / CACHE_MANIFEST).read_text())["shard_files"]
            == json.loads((rec.dir / CACHE_MANIFEST).read_text())["shard_files"])


def test_loader_opens_only_the_shards_it_needs_and_feeds_the_engine(make_config, workdir, upstream):
    rec = run_stage(SPECS["cache"], make_config(*SMALL, "cache.examples_per_shard=8", "cache.splits=[train]"),
                    workdir, upstream)
    pairs = load_split(upstream["pairs"].dir, "train")
    loader = CachedPairs(rec.dir, pairs, "train", max_open_shards=2)
    assert len(loader.shards) == 9 and len(loader) == 70
    loader[10], loader[44]
    assert loader.opened_shards == {1, 5} and loader.open_shards == [1, 5]
    loader[[0, 20, 69]]
    assert loader.opened_shards == {0, 1, 2, 5, 8} and len(loader.open_shards) == 2
    with pytest.raises(KeyError, match="no validation/nsp"):
        CachedPairs(rec.dir, pairs, "validation")
    with pytest.raises(ValueError, match="different pairs outputs"):
        CachedPairs(rec.dir, pairs.head(10), "train")

    # the engine batches it as it batches the plain pairs: a distillation-shaped loss trains
    def loss_fn(model, batch):
        out = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], return_dict=True)
        logits = model.cls.predictions(out.last_hidden_state[batch["teacher_position_mask"]]).float()
        student = logits.log_softmax(-1).gather(1, batch["teacher_topk_ids"])
        kd = -(soft_targets(batch["teacher_topk_probs"], 2.0) * student).sum(-1).mean()
        real = batch["attention_mask"].bool()
        mse = (out.last_hidden_state - batch[f"teacher_hidden_{LAYERS}"].float())[real].pow(2).mean()
        return kd + mse, {"kd": kd.detach(), "mse": mse.detach()}

    torch.manual_seed(1)
    student = build_bert_for_pretraining(bert_config(VOCAB, HIDDEN, 1, 2, 64, 64, pad_token_id=PAD))
    train_cfg = TrainingConfig(max_steps=3, batch_size=8, effective_batch_size=8, warmup_steps=0,
                               checkpoint_every=0, log_every=1, precision="fp32")
    result = engine.train(student, loss_fn, loader, train_cfg, loader.collator(PAD), seed=0)
    assert result.steps == 3 and np.isfinite(result.final_losses["train_kd"])


def test_cache_config_is_checked(make_config):
    with pytest.raises(ConfigError, match="cache.hidden_layers"):
        make_config("cache.hidden_layers=[-1]")
    with pytest.raises(ConfigError, match="above the teacher"):
        make_config("cache.hidden_layers=[9]")
    with pytest.raises(ConfigError, match="cache.views"):
        make_config("cache.views=[mlm]")
    assert make_config("cache.hidden_layers=[2,0]").cache.hidden_layers == [0, 2]
