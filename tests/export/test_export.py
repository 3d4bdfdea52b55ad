"""tasks/export/: the ONNX fp32 export of a tiny model matches a fresh PyTorch forward at batch sizes and
lengths it was not traced with; the int8 variants keep a tiny classifier's accuracy; the stage caches,
names the model and the difference when an export is outside tolerance, and leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from tasks.evaluate import variants
from tasks.export import formats
from tasks.export import outputs as export
from tasks.export.config import VARIANTS
from tasks.pipeline import SPECS
from tasks.stage import StageError, run_stage

SENTENCES = ["the film was good", "a dull plot and the music of it was awful with this ending", "great",
             "the cast is poor", "lovely"]


def test_onnx_export_matches_pytorch_with_dynamic_axes(tiny_export):
    stage_dir = tiny_export["record"].dir
    infos = export.exported_models(stage_dir)
    assert list(infos) == ["lightbert-teacher", "lightbert-distilbert-keywords"]
    fresh = {"lightbert-teacher": BertModel.from_pretrained(tiny_export["upstream"]["teacher"].dir / "model"),
             "lightbert-distilbert-keywords": AutoModelForSequenceClassification.from_pretrained(
                 tiny_export["classifier"])}
    for name, model in fresh.items():
        info = infos[name]
        graph = onnx.load(str(stage_dir / export.model_slug(name) / "onnx-fp32" / formats.ONNX_FILE)).graph
        assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input] == [["batch", "sequence"]] * len(
            info["inputs"])
        assert info["variants"]["onnx-fp32"]["max_abs_diff"] <= tiny_export["config"].export.fp32_atol
        session = formats.OrtRunner(stage_dir / export.model_slug(name) / "onnx-fp32" / formats.ONNX_FILE, threads=1)
        tok = AutoTokenizer.from_pretrained(str(stage_dir / export.model_slug(name) / "onnx-fp32"))  # carried along
        for batch in (1, 3, 5):  # traced at 2 x 8: other batch sizes and lengths, with padding
            enc = tok(SENTENCES[:batch], padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model(**{k: enc[k] for k in info["inputs"]})
            expected = (out.logits if info["output"] == "logits" else out.last_hidden_state).numpy()
            feed = {k: enc[k].numpy() for k in info["inputs"]}
            got = session(feed)
            assert got.shape == expected.shape
            assert formats.max_abs_difference(expected, got, feed) < 1e-4


def test_int8_variants_keep_the_accuracy_of_a_tiny_classifier(tiny_export):
    stage_dir, (data, info) = tiny_export["record"].dir, tiny_export["task"]
    exported = export.exported_models(stage_dir)["lightbert-distilbert-keywords"]
    runners = {("lightbert-distilbert-keywords", v): export.load_runner(stage_dir, exported, v, threads=1)
               for v in VARIANTS}
    scores = variants.accuracy_of(runners, stage_dir, exported, data, info, max_len=32, bootstrap=200)
    fp32 = scores["pytorch-fp32"]["test"]["accuracy"]
    assert fp32 >= 0.9, scores  # the classifier learned the task, so the comparison means something
    assert scores["onnx-fp32"]["test"]["accuracy"] == fp32
    for v in ("onnx-int8", "pytorch-int8"):
        assert abs(scores[v]["test"]["accuracy"] - fp32) <= 0.03, (v, scores[v]["test"], fp32)
        low, high = scores[v]["test_ci95"]
        assert low <= scores[v]["test"]["accuracy"] <= high
        assert exported["variants"][v]["argmax_agreement"] >= 0.9
    sizes = {v: exported["variants"][v]["disk_bytes"] for v in VARIANTS}
    assert sizes["onnx-int8"] < sizes["onnx-fp32"] and sizes["pytorch-int8"] < sizes["pytorch-fp32"]


def test_every_variant_is_timed_in_one_interleaved_run(tiny_export):
    stage_dir = tiny_export["record"].dir
    infos = export.exported_models(stage_dir)
    runners = variants.load_runners(stage_dir, infos, threads=1)
    feeds = variants.timing_feeds(stage_dir, infos, SENTENCES, batch_size=2, max_len=32)
    threads = torch.get_num_threads()
    timing = variants.interleaved_timing(runners, feeds, repeats=2, threads=1)
    assert torch.get_num_threads() == threads and set(timing) == set(runners) and len(timing) == 2 * len(VARIANTS)
    for t in timing.values():
        assert len(t["latency_passes"]) == len(t["throughput_passes"]) == 2
        assert t["cpu_latency_ms"] > 0 and t["throughput_sequences_per_s"] > 0


def test_export_stage_is_cached_and_carries_the_tokenizer(tiny_export):
    record = tiny_export["record"]
    again = run_stage(SPECS["export"], tiny_export["config"], tiny_export["workdir"], tiny_export["upstream"])
    assert again.cached and again.fingerprint == record.fingerprint
    assert [m["name"] for m in record.manifest["models"]] == [
        f"lightbert-{slug}-onnx-{p}" for slug in ("teacher", "distilbert-keywords") for p in ("fp32", "int8")]
    for info in export.exported_models(record.dir).values():
        for v in ("onnx-fp32", "onnx-int8", "pytorch-int8"):
            folder = export.variant_path(record.dir, info, v)
            assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
        saved = json.loads((record.dir / export.model_slug(info["name"]) / export.EXPORT_JSON).read_text())
        assert saved == info and set(saved["variants"]) == set(VARIANTS)


def test_an_export_outside_tolerance_stops_naming_the_model_and_the_difference(tiny_export, tmp_path):
    cfg = tiny_export["config"].model_copy(deep=True)
    cfg.export.fp32_atol, cfg.export.models = 1e-12, ["lightbert-teacher"]
    with pytest.raises(StageError) as err:
        run_stage(SPECS["export"], cfg, tmp_path / "work", tiny_export["upstream"])
    message = str(err.value)
    assert "lightbert-teacher" in message and "differs from PyTorch by up to" in message
    assert "export.fp32_atol=1e-12" in message and "nothing was registered" in message
    assert not (tmp_path / "work" / "export").exists()  # only the partial attempt, never a finished stage


def test_an_unknown_model_name_is_refused_with_the_saved_ones(tiny_export, tmp_path):
    cfg = tiny_export["config"].model_copy(deep=True)
    cfg.export.models = ["lightbert-bert-large"]
    with pytest.raises(StageError, match=r"export.models names \['lightbert-bert-large'\].*lightbert-distilbert-keywords"):
        run_stage(SPECS["export"], cfg, tmp_path / "work", tiny_export["upstream"])


def test_max_abs_difference_ignores_padding():
    feed = {"attention_mask": np.array([[1, 1, 0]])}
    a, b = np.zeros((1, 3, 2), np.float32), np.zeros((1, 3, 2), np.float32)
    b[0, 2] = 5.0  # a padded position
    b[0, 1, 0] = 0.25
    assert formats.max_abs_difference(a, b, feed) == 0.25
