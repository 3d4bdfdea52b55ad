"""tasks/downstream/finetune.py: tiny saved BERT, DistilBERT and ALBERT checkpoints fine-tuned on a learnable task
(classification and regression), the checkpoint chosen on validation, seeds, and the distillation loss."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertConfig, BertForPreTraining, BertTokenizerFast, DistilBertForMaskedLM

from models.albert import albert_config, albert_layers, build_albert_for_pretraining
from models.distilbert import student_config
from tasks import engine
from tasks.downstream import finetune
from tasks.downstream.config import DownstreamConfig, TaskDistillConfig

INFO = {"task": "synthetic", "num_labels": 2, "task_type": "classification", "metric": "accuracy"}


POSITIVE = "good great lovely superb".split()
NEGATIVE = "bad awful dull poor".split()
NEUTRAL = ("the a film movie story actor plot scene music ending cast script was is and of with it this "
           "director camera long short").split()


def synthetic_task(n: int, seed: int) -> Dataset:
    """Neutral words with one sentiment word somewhere: the label is which kind it is."""
    rng = random.Random(seed)
    cols: dict[str, list] = {"id": [], "text": [], "label": []}
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        cols["id"].append(f"{seed}-{i}")
        cols["text"].append(" ".join(words))
        cols["label"].append(label)
    return Dataset.from_dict(cols)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random BERT, DistilBERT and ALBERT (attention shared across layers) saved with a tokenizer,
    as the pipeline's stages save them."""
    root = tmp_path_factory.mktemp("downstream-models")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab))
    size = len(tok)
    bert = BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    models = {
        "bert": BertForPreTraining(bert),
        "distilbert": DistilBertForMaskedLM(student_config(bert, 2)),
        "albert": build_albert_for_pretraining(albert_config(size, 16, 32, 2, 2, 64, 64, sharing="attention")),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def synthetic_data() -> DatasetDict:
    return DatasetDict({"train": synthetic_task(320, 0), "validation": synthetic_task(64, 1),
                        "test": synthetic_task(200, 2)})


FINETUNE = DownstreamConfig(epochs=6.0, batch_size=16, learning_rates={"bert": [3e-3], "distilbert": [3e-3],
                            "albert": [3e-3]}, warmup_fraction=0.1, dropout=0.0, max_seq_len=32, evals_per_epoch=2)
RT = engine.setup_runtime("fp32")


def tokenized(model_dir: Path, data: DatasetDict) -> DatasetDict:
    return finetune.tokenize_task(data, model_dir, 32, with_types=finetune.model_family(model_dir) != "distilbert")


@pytest.mark.parametrize("family", ["bert", "distilbert", "albert"])
def test_finetuning_learns(family: str, checkpoints, synthetic_data, one_torch_thread) -> None:
    res = finetune.fit(checkpoints[family], tokenized(checkpoints[family], synthetic_data), INFO, FINETUNE,
                       learning_rate=3e-3, seed=3, rt=RT)
    assert res.model.config.model_type == family and res.steps == 6 * 20
    assert res.test["accuracy"] >= 0.9, res.test
    assert set(res.test) == {"accuracy", "macro_f1", "f1", "mcc"}
    # validation 2x per epoch (every 10 steps; the 12th pass is the end), the best pass's weights kept
    assert [h["step"] for h in res.history] == list(range(10, 121, 10))
    assert res.validation["accuracy"] == max(h["accuracy"] for h in res.history)
    assert res.best_step == next(h["step"] for h in res.history if h["accuracy"] == res.validation["accuracy"])
    record = res.record(regression=False)
    assert len(record["test_predictions"]) == 200 and record["train_tokens_per_s"] > 0


def test_albert_classifier_keeps_the_sharing_ties(checkpoints) -> None:
    model = finetune.load_classifier(checkpoints["albert"], num_labels=2, dropout=0.1)
    layers = albert_layers(model)
    assert len(layers) == 2 and layers[0].attention is layers[1].attention and layers[0].ffn is not layers[1].ffn
    assert model.config.classifier_dropout_prob == 0.1


def test_same_seed_same_result_on_cpu(checkpoints, synthetic_data, one_torch_thread) -> None:
    cfg = DownstreamConfig(**{**FINETUNE.model_dump(), "epochs": 0.5, "dropout": 0.1})
    data = tokenized(checkpoints["albert"], synthetic_data)
    a, b = (finetune.fit(checkpoints["albert"], data, INFO, cfg, learning_rate=3e-3, seed=7, rt=RT) for _ in range(2))
    assert a.steps == 10  # half of 20 batches
    assert a.record(False)["test_predictions"] == b.record(False)["test_predictions"]
    assert a.final_losses == b.final_losses
    c = finetune.fit(checkpoints["albert"], data, INFO, cfg, learning_rate=3e-3, seed=8, rt=RT)
    assert c.final_losses != a.final_losses


def test_regression_task_trains_a_one_output_head(checkpoints, synthetic_data, one_torch_thread) -> None:
    """The label is a number (here 2 for a positive word, -1 for a negative one): one output, MSE."""
    data = DatasetDict({s: d.map(lambda r: {"label": 2.0 if r["label"] else -1.0}) for s, d in synthetic_data.items()})
    info = {"task": "synthetic-regression", "num_labels": 1, "task_type": "regression", "metric": "pearson"}
    res = finetune.fit(checkpoints["bert"], tokenized(checkpoints["bert"], data), info, FINETUNE,
                       learning_rate=3e-3, seed=3, rt=RT)
    assert res.model.config.num_labels == 1 and res.test_logits.shape == (200, 1)
    assert set(res.test) == {"pearson", "spearman", "mse"} and res.test["pearson"] > 0.9, res.test


def test_distillation_follows_the_teachers_soft_labels(checkpoints, synthetic_data, one_torch_thread) -> None:
    """With alpha_hard 0 the student learns from the teacher's logits alone: given a teacher whose logits
    say the OPPOSITE of the labels, it learns the opposite (its validation accuracy ends near 0), so the
    targets really are the teacher's; and the weights kept are still the best on validation."""
    data = tokenized(checkpoints["distilbert"], synthetic_data)
    labels = np.asarray(data["train"]["labels"])
    flipped = np.stack([4.0 * labels - 2.0, 2.0 - 4.0 * labels], axis=1).astype(np.float32)  # favours 1 - label
    kd = TaskDistillConfig(alpha_ce=1.0, alpha_hard=0.0, temperature=2.0)
    res = finetune.fit(checkpoints["distilbert"], data, INFO, DownstreamConfig(**{**FINETUNE.model_dump(), "epochs": 3}),
                       learning_rate=3e-3, seed=3, rt=RT, targets=finetune.TeacherTargets(logits=flipped), kd=kd)
    assert res.history[-1]["accuracy"] <= 0.1, res.history
    assert res.validation["accuracy"] == max(h["accuracy"] for h in res.history) > res.history[-1]["accuracy"]
    assert {"train_soft_loss", "train_hard_loss"} <= set(res.final_losses)
    with pytest.raises(Exception, match="cover 3 train examples"):
        finetune.fit(checkpoints["distilbert"], data, INFO, FINETUNE, learning_rate=3e-3, seed=3, rt=RT,
                     targets=finetune.TeacherTargets(logits=flipped[:3]), kd=kd)
