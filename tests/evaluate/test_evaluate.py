"""tasks/evaluate/: scoring agrees with the teacher stage's own evaluation, both sentence-pair tasks with
the model's own head, the speed measures, and the errors. The whole stage and report.json run in
tests/test_pipeline.py (the real flow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

from models.albert import albert_config, build_albert_for_pretraining
from models.bert import bert_config, build_bert_for_pretraining
from tasks.engine import setup_runtime
from tasks.evaluate import build as evaluate
from tasks.stage import StageContext, StageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_teacher_scores_match_the_teacher_stage(smoke_stages):
    """Same validation pairs, same masked positions: the evaluate stage's MLM and NSP figures for the
    teacher are the ones the teacher stage measured with its own evaluation code."""
    records = smoke_stages["records"]
    path = records["teacher"].dir / "model"
    model, family = evaluate.load_model(path)
    assert family == "bert"
    rt = setup_runtime("fp32")
    nsp = evaluate.score_view(model, family, evaluate.load_view(records["pairs"].dir, "nsp"), 0, 64, rt,
                              with_mlm=True)
    counts = records["teacher"].manifest["counts"]
    assert nsp["mlm_accuracy"] == pytest.approx(counts["val_mlm_accuracy"], abs=6e-6)
    assert nsp["mlm_perplexity"] == pytest.approx(counts["val_mlm_perplexity"], rel=1e-4)
    assert nsp["pair_accuracy"] == pytest.approx(counts["val_nsp_accuracy"], abs=6e-6)
    # the NSP head on the SOP view: same examples, the order labels instead
    sop = evaluate.score_view(model, family, evaluate.load_view(records["pairs"].dir, "sop"), 0, 64, rt,
                              with_mlm=False)
    assert sop["pairs"] == nsp["pairs"] and "mlm_accuracy" not in sop
    low, high = sop["pair_accuracy_ci95"]
    assert low <= sop["pair_accuracy"] <= high
    assert 0.5 <= sop["majority_accuracy"] <= 1


def _vocab(tmp_path: Path) -> BertTokenizerFast:
    words = "the film was good bad great awful a movie plot actor long short very".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))


def test_speed_measures_run_and_restore_threads(tmp_path):
    tok = _vocab(tmp_path)
    sentences = ["the film was good", "a very long movie plot", "the actor was awful", "great"]
    torch.manual_seed(0)
    bert = build_bert_for_pretraining(bert_config(len(tok), 32, 2, 2, 64, 64))
    albert = build_albert_for_pretraining(albert_config(len(tok), 16, 32, 2, 2, 64, 64, sharing="all"))
    threads = torch.get_num_threads()
    for model, family in ((bert, "bert"), (albert, "albert")):
        inputs = evaluate.encode_sentences(tok, sentences, family, 16)
        assert [len(i["input_ids"][0]) for i in inputs] == [len(tok(s)["input_ids"]) for s in sentences]
        lat = evaluate.cpu_latency(model, inputs, repeats=3, threads=2)
        assert len(lat["cpu_latency_passes"]) == 3 and torch.get_num_threads() == threads
        assert lat["cpu_latency_ms"] == pytest.approx(1000 * lat["cpu_latency_pass_seconds"] / len(sentences))
        # the GPU path's code, on the CPU in fp32
        per_s = evaluate.throughput(model, tok, sentences, family, batch_size=3, max_len=16,
                                    device=torch.device("cpu"), dtype=None, min_batches=4)
        assert per_s > 0


def test_parameters_count_the_backbone_once(tmp_path):
    tok = _vocab(tmp_path)
    shared = build_albert_for_pretraining(albert_config(len(tok), 16, 32, 4, 2, 64, 64, sharing="all"))
    unshared = build_albert_for_pretraining(albert_config(len(tok), 16, 32, 4, 2, 64, 64, sharing="none"))
    from models.albert import count_parameters

    one_layer = count_parameters(unshared.albert.encoder.albert_layer_groups[0])
    assert (count_parameters(evaluate.backbone(unshared)) - count_parameters(evaluate.backbone(shared))
            == 3 * one_layer)


def test_models_not_trained_are_a_clear_error(smoke_stages, make_config, tmp_path):
    records = smoke_stages["records"]
    cfg = make_config("evaluate.models=[teacher, albert-distilled]")
    ctx = StageContext("evaluate", tmp_path / "out", tmp_path / "scratch",
                       {"teacher": records["teacher"], "pairs": records["pairs"]}, cfg)
    with pytest.raises(StageError, match=r"evaluate.models names \['albert-distilled'\].*did not train"):
        evaluate.models_to_evaluate(cfg, ctx)
    # the default: every model the run trained, the teacher first
    ctx.config = cfg = make_config()
    assert [m["name"] for m in evaluate.models_to_evaluate(cfg, ctx)] == ["teacher"]
    with pytest.raises(StageError, match="model type 'gpt2'"):
        (tmp_path / "gpt").mkdir()
        (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
        evaluate.load_model(tmp_path / "gpt")
