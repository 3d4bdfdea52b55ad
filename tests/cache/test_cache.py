"""tasks/cache/ and tasks/cache/outputs.py through tasks.stage.run_stage, on a hand-made teacher (a tiny
BertForPreTraining saved with save_pretrained) and hand-made pairs in the pairs schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_pairs

from models.bert import bert_config, build_bert_for_pretraining
from tasks import engine
from tasks.artifacts import hash_tree, sha256_json
from tasks.cache import build as cache
from tasks.cache.outputs import (
    CACHE_MANIFEST,
    FORMAT,
    CachedPairs,
    ExampleOutputs,
    PartSize,
    dequantise_hidden,
    estimate_cache_bytes,
    pack_shard,
    probs_from_codes,
    quantise_hidden,
    quantise_logprobs,
    read_cache_manifest,
    soft_targets,
    write_shard,
)
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


STEP = 1 / 16  # nats per stored log-ratio code, as outputs.py states (its bounds follow from it)


def hidden_bound(rows: np.ndarray) -> np.ndarray:
    """The int8 reconstruction bound per row (outputs.py): max|h| / 254 (1 + 2^-11)."""
    return np.abs(rows).max(-1, keepdims=True) / 254 * (1 + 2 ** -11)


@pytest.mark.parametrize("positions,layers,views,hidden_at", [("masked", "last", "[nsp,sop]", "masked"),
                                                                ("all", "[0,1,2]", "[nsp]", "all"),
                                                                ("masked", "last", "[nsp]", "none")])
def test_cached_outputs_equal_a_fresh_teacher_forward(make_config, workdir, upstream, positions, layers, views,
                                                      hidden_at):
    top_k = 8 if positions == "masked" else VOCAB  # k = vocabulary: the full distribution
    cfg = make_config(*SMALL, f"cache.top_k={top_k}", f"cache.positions={positions}",
                      f"cache.hidden_layers={layers}", f"cache.views={views}", f"cache.hidden_positions={hidden_at}",
                      *(["distilbert.alpha_cos=0"] if hidden_at == "none" else []))  # no Lcos without hidden states
    rec = run_stage(SPECS["cache"], cfg, workdir, upstream)
    counts = rec.manifest["counts"]
    want_layers = [] if hidden_at == "none" else [LAYERS] if layers == "last" else [0, 1, 2]
    n_views = 2 if "sop" in views else 1
    assert counts["examples"] == (70 + 20) * n_views
    assert counts["shards"] == counts["shards_computed"] == (5 + 2) * n_views and counts["shards_reused"] == 0
    manifest = json.loads((rec.dir / CACHE_MANIFEST).read_text())
    assert manifest["layers"] == want_layers and manifest["top_k"] == top_k and manifest["version"] == 2
    assert manifest["hidden_positions"] == hidden_at
    assert manifest["tensors"]["topk_ids"]["dtype"] == manifest["tensors"]["positions"]["dtype"] == "uint16"
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
            masked = labels[0] != -100
            where = masked if positions == "masked" else attn[0].bool()
            logp = out.prediction_logits[0][where].log_softmax(-1)
            top = logp.topk(top_k, dim=-1)
            assert row["teacher_positions"].tolist() == where.nonzero()[:, 0].tolist()
            assert np.array_equal(row["teacher_topk_ids"], top.indices.numpy())
            # the bound of outputs.py (1/16 nat + fp16 mass), plus float32 noise between two forwards
            np.testing.assert_allclose(np.log(row["teacher_topk_probs"]), top.values.numpy(),
                                       atol=STEP + 2 ** -11 + 1e-4, rtol=0)
            np.testing.assert_allclose(row["teacher_topk_mass"], top.values.exp().sum(-1).numpy(), rtol=1e-3)
            hidden_where = {"masked": masked, "all": attn[0].bool(), "none": torch.zeros_like(masked)}[hidden_at]
            assert row["teacher_hidden_positions"].tolist() == hidden_where.nonzero()[:, 0].tolist()
            assert set(row) >= {f"teacher_hidden_{layer}" for layer in want_layers}
            for layer in want_layers:
                stored = row[f"teacher_hidden_{layer}"]
                fresh = out.hidden_states[layer][0][hidden_where].numpy()
                assert stored.shape == (int(hidden_where.sum()), HIDDEN)
                assert (np.abs(stored - fresh) <= hidden_bound(fresh) + 1e-4).all()
            if top_k == VOCAB and where.any():  # softened over the full support = softmax(z / T)
                np.testing.assert_allclose(row["teacher_topk_mass"], 1.0, atol=1e-3)
                scattered = torch.zeros(int(where.sum()), VOCAB).scatter_(
                    1, torch.from_numpy(row["teacher_topk_ids"].astype(np.int64)),
                    soft_targets(torch.from_numpy(row["teacher_topk_probs"]), 2.0))
                exact = (out.prediction_logits[0][where] / 2.0).softmax(-1)
                assert ((scattered.log() - exact.log()).abs() <= STEP / 2.0 + 1e-4).all()

        # a collated batch lines up with the padded input
        collate = loader.collator(PAD)
        batch = collate(loader[chosen])
        masked, real = batch[cols[3]] != -100, batch[cols[2]].bool()
        assert torch.equal(batch["teacher_position_mask"], masked if positions == "masked" else real)
        assert torch.equal(batch["teacher_topk_ids"], torch.from_numpy(
            np.concatenate([loader[i]["teacher_topk_ids"] for i in chosen]).astype(np.int64)))
        hidden_mask = batch["teacher_hidden_mask"]
        assert torch.equal(hidden_mask, {"masked": masked, "all": real, "none": torch.zeros_like(real)}[hidden_at])
        for layer in want_layers:  # one row per True of the mask, in row-major order
            hidden = batch[f"teacher_hidden_{layer}"]
            assert hidden.shape == (int(hidden_mask.sum()), HIDDEN) and hidden.dtype == torch.float32
            assert torch.equal(hidden, torch.from_numpy(np.concatenate([loader[i][f"teacher_hidden_{layer}"]
                                                                        for i in chosen])))


def test_budget_refuses_an_over_large_cache_with_the_estimate(make_config, workdir, upstream):
    cfg = make_config(*SMALL, "cache.max_bytes=5000")
    with pytest.raises(StageError) as err:
        run_stage(SPECS["cache"], cfg, workdir, upstream)
    message = str(err.value)
    assert "estimated" in message and "cache.max_bytes = " in message and "5,000 bytes" in message
    for setting in ("cache.top_k", "cache.hidden_layers", "cache.hidden_positions", "pairs.dupe_factor",
                    "cache.max_bytes"):
        assert setting in message
    assert not list(workdir.rglob("*.safetensors"))  # refused before anything was written
    estimate = int(message.split("(")[1].split(" bytes")[0].replace(",", ""))

    rec = run_stage(SPECS["cache"], make_config(*SMALL), workdir, upstream)
    counts = rec.manifest["counts"]
    assert counts["estimated_bytes"] == estimate
    assert abs(counts["bytes"] - estimate) / counts["bytes"] < 0.02, (counts["bytes"], estimate)
    assert counts["hidden_positions"] == counts["positions"] > 0  # both at the masked positions by default
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
        rows = out.last_hidden_state[batch["teacher_hidden_mask"]]
        mse = (rows - batch[f"teacher_hidden_{LAYERS}"]).pow(2).mean()
        return kd + mse, {"kd": kd.detach(), "mse": mse.detach()}

    torch.manual_seed(1)
    student = build_bert_for_pretraining(bert_config(VOCAB, HIDDEN, 1, 2, 64, 64, pad_token_id=PAD))
    train_cfg = TrainingConfig(max_steps=3, batch_size=8, effective_batch_size=8, warmup_steps=0,
                               checkpoint_every=0, log_every=1, precision="fp32")
    result = engine.train(student, loss_fn, loader, train_cfg, loader.collator(PAD), seed=0)
    assert result.steps == 3 and np.isfinite(result.final_losses["train_kd"])


def reference_scores(model, ids: torch.Tensor, types: torch.Tensor, layer: int) -> np.ndarray:
    """(heads, n, n) attention scores q.k / sqrt(d) of teacher layer `layer` for one unpadded example, in
    float64 from the layer's own weights (written here, not taken from lightbert)."""
    with torch.no_grad():
        out = model.bert(input_ids=ids, token_type_ids=types, output_hidden_states=True)
        x = out.hidden_states[layer - 1][0].double()
        attn = model.bert.encoder.layer[layer - 1].attention.self
        heads = model.config.num_attention_heads
        d = x.shape[-1] // heads
        q = (x @ attn.query.weight.double().T + attn.query.bias.double()).view(-1, heads, d).transpose(0, 1)
        k = (x @ attn.key.weight.double().T + attn.key.bias.double()).view(-1, heads, d).transpose(0, 1)
        return (q @ k.transpose(1, 2) / d ** 0.5).numpy()


def test_attention_maps_are_cached_for_the_train_nsp_view(make_config, workdir, upstream):
    """cache.attention_layers keeps each listed teacher layer's scores between the real tokens (float16) for
    the train split's nsp view; they equal a float64 reference, the estimate holds, and a batch pads them."""
    cfg = make_config(*SMALL, "cache.attention_layers=[1, 2]", "cache.views=[nsp, sop]")
    rec = run_stage(SPECS["cache"], cfg, workdir, upstream)
    manifest = json.loads((rec.dir / CACHE_MANIFEST).read_text())
    assert manifest["attention"]["layers"] == [1, 2] and manifest["attention"]["heads"] == 2
    assert (manifest["attention"]["split"], manifest["attention"]["view"]) == ("train", "nsp")
    counts = rec.manifest["counts"]
    assert abs(counts["bytes"] - counts["estimated_bytes"]) / counts["bytes"] < 0.02
    pairs = load_split(upstream["pairs"].dir, "train")
    lengths = np.asarray(pairs["length"], dtype=np.int64)
    assert rec.manifest["details"]["estimate"]["attention"] == 2 * 2 * 2 * int((lengths ** 2).sum())
    assert CachedPairs(rec.dir, pairs, "train", "sop").attention_layers == []  # other parts hold none
    assert CachedPairs(rec.dir, load_split(upstream["pairs"].dir, "validation"), "validation").attention_layers == []

    loader = CachedPairs(rec.dir, pairs, "train", "nsp")
    model = fresh_teacher(upstream)
    chosen = padded_examples(lengths, 256, 16, 3) + [int(np.argmin(lengths))]  # padded in their inference batch
    for i in chosen:
        row = loader[i]
        ids, types = (torch.tensor(np.asarray(pairs[i][c]))[None] for c in ("input_ids", "token_type_ids"))
        for layer in (1, 2):
            stored, exact = row[f"teacher_attention_{layer}"], reference_scores(model, ids, types, layer)
            assert stored.dtype == np.float16 and stored.shape == (2, lengths[i], lengths[i])
            assert np.abs(stored - exact).max() <= np.abs(exact).max() * 2 ** -11 + 1e-4  # fp16 rounding
    only_two = CachedPairs(rec.dir, pairs, "train", "nsp", attention=[2])
    assert only_two.attention_layers == [2] and "teacher_attention_1" not in only_two[0]

    batch = loader.collator(PAD)(loader[chosen])
    t = batch["input_ids"].shape[1]
    for j, i in enumerate(chosen):
        maps = batch["teacher_attention_2"][j]
        n = int(lengths[i])
        assert maps.shape == (2, t, t) and torch.equal(maps[:, :n, :n], torch.from_numpy(
            loader[i]["teacher_attention_2"].astype(np.float32)))
        assert not maps[:, n:].any() and not maps[:, :, n:].any()  # zero at the padding


def test_attention_maps_over_the_budget(make_config, workdir, upstream, tmp_path):
    """auto keeps the attention maps of distilbert.matches only when the cache with them fits cache.max_bytes
    (else the student's step computes them, and the stage says why); an explicit list over the budget is
    refused with the maps' share in the message."""
    match = "distilbert.matches=[{teacher_layer: 2, student_layer: 1, feature: attention}]"
    plain = run_stage(SPECS["cache"], make_config(*SMALL), workdir, upstream).manifest["counts"]["estimated_bytes"]
    auto = make_config(*SMALL, match)
    assert cache.resolve_attention_layers(auto, fresh_teacher(upstream).config) == [2]
    assert cache.resolve_attention_layers(make_config(*SMALL, match, "distilbert.mode=online"),
                                          fresh_teacher(upstream).config) == []  # online needs no cache

    budget = f"cache.max_bytes={plain + 100}"  # room for the rest, not for the maps
    rec = run_stage(SPECS["cache"], make_config(*SMALL, match, budget), tmp_path / "w1", upstream)
    manifest = json.loads((rec.dir / CACHE_MANIFEST).read_text())
    assert manifest["attention"]["layers"] == [] and "with the teacher in its step" in manifest["attention"]["online"]
    assert "attention_online" in rec.manifest["details"]
    rec = run_stage(SPECS["cache"], make_config(*SMALL, match), tmp_path / "w2", upstream)
    assert json.loads((rec.dir / CACHE_MANIFEST).read_text())["attention"]["layers"] == [2]

    with pytest.raises(StageError, match="attention maps: ") as err:
        run_stage(SPECS["cache"], make_config(*SMALL, "cache.attention_layers=[2]", budget), tmp_path / "w3", upstream)
    assert "cache.attention_layers" in str(err.value)
    with pytest.raises(StageError, match="teacher has 2 layers"):
        # the configuration knows another teacher than the upstream one (as with a pretrained teacher)
        run_stage(SPECS["cache"], make_config(*SMALL, "cache.attention_layers=[3]", "teacher.num_layers=4"),
                  tmp_path / "w4", upstream)


def test_cached_attention_gives_the_loss_the_online_teacher_gives(make_config, workdir, upstream):
    """The student's attention term from cached maps equals the one from the teacher in the step, in cached
    mode without maps in the cache and in online mode, within the float16 rounding of the scores."""
    from models.distilbert import build_student
    from models.intermediate import Match
    from models.losses import LossWeights
    from tasks.distilbert import build as distilbert

    rec = run_stage(SPECS["cache"], make_config(*SMALL, "cache.attention_layers=[2]"), workdir, upstream)
    pairs = load_split(upstream["pairs"].dir, "train")
    loader = CachedPairs(rec.dir, pairs, "train", "nsp")
    batch = loader.collator(PAD)(loader[list(range(12))])
    teacher = fresh_teacher(upstream)
    torch.manual_seed(3)
    student = build_student(teacher.config, 2, 0.0).eval()
    terms = {}
    for mode, name in (("cached", "cached"), ("cached", "in the step"), ("online", "online")):
        for target in ("scores", "probs"):
            run = distilbert.StudentRun("random", LossWeights(1.0, 1.0, 0.0), "last", mode,
                                        matches=(Match(2, 1, "attention", "mse", 1.0, target),))
            cached = (2,) if name == "cached" else ()
            loss_fn = distilbert.make_loss_fn(run, [(2, LAYERS)], teacher=teacher, cached_attention=cached)
            with torch.no_grad():
                _, out = loss_fn(student, batch)
            terms[name, target] = out["attention_s1_t2_loss"].item()
    for target in ("scores", "probs"):
        assert terms["cached", target] > 0
        assert terms["cached", target] == pytest.approx(terms["in the step", target], rel=2e-3)
        assert terms["online", target] == pytest.approx(terms["in the step", target], rel=1e-6)
    with pytest.raises(ValueError, match="needs the teacher"):  # maps neither cached nor computable
        distilbert.make_loss_fn(replace(run, mode="cached"), [(2, LAYERS)], cached_attention=())


def test_cache_config_is_checked(make_config):
    with pytest.raises(ConfigError, match="cache.hidden_layers"):
        make_config("cache.hidden_layers=[-1]")
    with pytest.raises(ConfigError, match="above the teacher"):
        make_config("cache.hidden_layers=[9]")
    with pytest.raises(ConfigError, match="cache.views"):
        make_config("cache.views=[mlm]")
    assert make_config("cache.hidden_layers=[2,0]").cache.hidden_layers == [0, 2]
    with pytest.raises(ConfigError, match="cache.attention_layers"):
        make_config("cache.attention_layers=[0]")
    with pytest.raises(ConfigError, match="above the teacher"):
        make_config("cache.attention_layers=[9]")


# ------------------------------------------------------------------------------------------------
# format v2: the shard round trip, the quantisation bounds, the refusal of v1, the sizes
# ------------------------------------------------------------------------------------------------
def random_example(rng: np.random.Generator, length: int, n_masked: int, k: int, hidden: int, vocab: int,
                   layers: list[int]) -> ExampleOutputs:
    pos = np.sort(rng.choice(length, size=n_masked, replace=False)).astype(np.int32)
    logp = torch.from_numpy(np.sort(-rng.exponential(2.0, size=(n_masked, k)).cumsum(-1), axis=-1)[:, ::-1].copy())
    rows = {layer: quantise_hidden(torch.from_numpy(rng.normal(size=(n_masked, hidden)).astype(np.float32)))
            for layer in layers}
    return ExampleOutputs(pos, rng.integers(0, vocab, size=(n_masked, k)).astype(np.int32),
                          quantise_logprobs(logp).numpy(), rng.random(n_masked).astype(np.float16), pos.copy(),
                          {layer: q.numpy() for layer, (q, _) in rows.items()},
                          {layer: s.numpy() for layer, (_, s) in rows.items()})


@pytest.mark.parametrize("vocab,id_dtype", [(30_522, np.uint16), (65_537, np.int32)])
def test_a_shard_round_trips_through_its_file(tmp_path, vocab, id_dtype):
    rng = np.random.default_rng(0)
    examples = [random_example(rng, 40, n, 8, 16, vocab, [1, 3]) for n in (5, 0, 7, 1)]
    tensors = pack_shard(100, examples, [1, 3], vocab_size=vocab, max_positions=512, hidden_size=16)
    assert tensors["topk_ids"].dtype == id_dtype and tensors["positions"].dtype == np.uint16
    assert tensors["topk_logratio"].dtype == np.uint8 and tensors["hidden_1"].dtype == np.int8
    assert tensors["hidden_3_scale"].dtype == np.float16 and tensors["topk_mass"].dtype == np.float16
    assert tensors["pos_offsets"].tolist() == tensors["hidden_offsets"].tolist() == [0, 5, 5, 12, 13]
    written = write_shard(tmp_path / "shard.safetensors", tensors, {"split": "train"})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "shard.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(tensors)
        for name, value in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == value.dtype and np.array_equal(back, value), name
    assert written["size"] == (tmp_path / "shard.safetensors").stat().st_size
    # example 2's rows are its own, in order
    assert np.array_equal(tensors["topk_ids"][5:12], examples[2].topk_ids.astype(id_dtype))
    assert np.array_equal(tensors["hidden_3"][5:12], examples[2].hidden[3])


def test_soft_label_codes_keep_the_stated_error_bound():
    """Against float64 probabilities: each stored log-ratio within 1/32 nat, soft targets at T within
    1/(16 T) nat, the loader's T=1 log-probabilities within 1/16 nat + fp16 mass (outputs.py)."""
    rng = np.random.default_rng(0)
    vocab, k = 2000, 64
    logits = rng.normal(size=(600, vocab)) * np.repeat([0.5, 2.0, 4.0, 12.0], 150)[:, None]  # flat ... peaked
    logp_full = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    top = np.sort(logp_full, axis=-1)[:, ::-1][:, :k].copy()  # float64 top-k log-probabilities
    mass = np.exp(top).sum(-1)
    codes = quantise_logprobs(torch.from_numpy(top)).numpy()
    assert codes.dtype == np.uint8 and (codes[:, 0] == 0).all()

    ratio = top - top[:, :1]
    in_range = ratio >= -255.5 * STEP
    assert in_range.all(1).sum() > 300 and (~in_range).any()  # both kinds of position are tested
    err = np.abs(-codes.astype(np.float64) * STEP - ratio)
    assert err[in_range].max() <= STEP / 2 + 1e-12
    assert err[in_range].max() > 0.9 * STEP / 2  # the bound is tight: the test measures the rounding
    assert (codes[~in_range] == 255).all()

    probs = probs_from_codes(codes, mass.astype(np.float16))  # what the loader gives, float32
    got = np.log(probs.astype(np.float64))
    rows = in_range.all(1)
    assert np.abs(got - top)[rows].max() <= STEP + 2 ** -11 * 1.001 + 1e-6
    # every entry, clamped ones too: at most 6.5% of p (+ the fp16 mass) or 1.2e-7 of p_1 away
    p_hat, p = np.exp(got), np.exp(top)
    assert (np.abs(p_hat - p) <= (np.exp(STEP) * (1 + 2 ** -11) * (1 + 1e-5) - 1) * p
            + np.exp(-255 * STEP) * p[:, :1] + 1e-9).all()
    for temperature in (1.0, 2.0, 4.0):
        soft = soft_targets(torch.from_numpy(probs), temperature).double().numpy()
        exact = np.exp(top / temperature) / np.exp(top / temperature).sum(-1, keepdims=True)
        log_err = np.abs(np.log(soft) - np.log(exact))[rows]
        assert log_err.max() <= STEP / temperature + 1e-5, temperature
        assert log_err.max() > 0.5 * STEP / temperature


def test_int8_hidden_rows_keep_the_stated_error_bound():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(500, 768)) * rng.lognormal(0.0, 1.5, size=(500, 1))  # rows of very different sizes
    rows[::50, 7] = 40.0 * np.abs(rows[::50]).max(-1)  # an outlier element in some rows
    rows[3] = 0.0  # a zero row stays zero
    values, scale = quantise_hidden(torch.from_numpy(rows))
    assert values.dtype == torch.int8 and scale.dtype == torch.float16 and int(values.abs().max()) <= 127
    back = dequantise_hidden(values.numpy(), scale.numpy()).astype(np.float64)
    err = np.abs(back - rows)
    bound = hidden_bound(rows)
    assert (err <= bound + 1e-6 * np.abs(rows).max(-1, keepdims=True)).all()
    assert (err / np.maximum(bound, 1e-30)).max() > 0.9  # the bound is tight: the test measures the rounding
    assert not back[3].any()
    cos = (back * rows).sum(-1) / (np.linalg.norm(back, axis=-1) * np.linalg.norm(rows, axis=-1) + 1e-30)
    # what Lcos sees: directions barely move; less so in a row with an outlier (the step is its absmax / 127)
    plain = np.ones(len(rows), dtype=bool)
    plain[::50], plain[3] = False, False
    assert cos[plain].min() > 0.9999 and cos[::50].min() > 0.997


def test_a_v1_cache_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "cache-abc123"
    old.mkdir()
    (old / CACHE_MANIFEST).write_text(json.dumps({"format": FORMAT, "version": 1, "splits": {}}))
    with pytest.raises(ValueError) as err:
        read_cache_manifest(old)
    message = str(err.value)
    assert str(old) in message and "v1" in message and "rebuild the cache stage" in message
    assert "`lightbert run` rebuilds it" in message
    with pytest.raises(ValueError, match="rebuild the cache stage"):
        CachedPairs(old, None, "train")  # refused before the pairs are looked at


BERT_BASE = {"top_k": 64, "vocab_size": 30_522, "max_positions": 512, "hidden_size": 768}


def bert_base_part(examples: int) -> PartSize:
    """128-token sequences, 15% masked (19.2 per sequence: 19 and 20 alternately below)."""
    masked = sum(19 + i % 5 // 4 for i in range(examples))
    return PartSize(examples, 128 * examples, masked, masked, 1)


@pytest.mark.parametrize("n_layers,limit", [(1, 200), (0, 50)])
def test_bytes_per_token_at_bert_base_shape(tmp_path, n_layers, limit):
    """The module docstring's figures, from the code's own size function and from a written shard."""
    many = bert_base_part(1_000_000)
    per_token = estimate_cache_bytes({"train/nsp": many}, n_layers=n_layers, **BERT_BASE)["total"] / many.tokens
    assert per_token == pytest.approx(145.4 if n_layers else 29.6, abs=0.05) and per_token <= limit

    rng = np.random.default_rng(2)
    layers = [12] if n_layers else []
    part = bert_base_part(160)
    examples = [random_example(rng, 128, 19 + i % 5 // 4, 64, 768, 30_522, layers) for i in range(part.examples)]
    if not n_layers:  # no hidden states: no hidden rows
        examples = [ExampleOutputs(e.positions, e.topk_ids, e.topk_logratio, e.topk_mass, e.positions[:0], {}, {})
                    for e in examples]
        part = PartSize(part.examples, part.tokens, part.positions, 0, 1)
    tensors = pack_shard(0, examples, layers, BERT_BASE["vocab_size"], BERT_BASE["max_positions"], 768)
    size = write_shard(tmp_path / "shard.safetensors", tensors, {"split": "train", "view": "nsp"})["size"]
    estimate = estimate_cache_bytes({"train/nsp": part}, n_layers=n_layers, **BERT_BASE)["total"]
    assert abs(size - estimate) / size < 0.002, (size, estimate)
    assert size / part.tokens <= limit


@pytest.mark.slow
def test_shards_on_a_dask_cluster_write_what_the_local_loop_writes(make_config, tmp_path, upstream):
    """The path run.task_runner: dask takes (one task per shard, the teacher loaded once per worker
    process), on a real 2-process local Dask cluster: the same files as the stage's own loop."""
    from distributed import Client, LocalCluster

    cfg = make_config(*SMALL)
    local = run_stage(SPECS["cache"], cfg, tmp_path / "local", upstream)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def shard_map(fn, jobs, shared):
            futures = client.map(fn, jobs, [shared] * len(jobs), key=[f"cache-{job.name}" for job in jobs])
            return client.gather(futures)

        on_dask = run_stage(SPECS["cache"], cfg, tmp_path / "dask", upstream, shard_map=shard_map)
        workers = {w["id"] for w in client.scheduler_info()["workers"].values()}
    assert on_dask.manifest["counts"]["shards_computed"] == local.manifest["counts"]["shards"] >= 2
    assert len(workers) == 2
    assert on_dask.manifest["output_fingerprint"] == local.manifest["output_fingerprint"]
