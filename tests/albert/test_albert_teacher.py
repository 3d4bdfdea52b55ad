"""tasks/albert/'s teacher variant through tasks.stage.run_stage on the smoke preset's stages: initialised
from the teacher (models/albert_init.py), trained at the same budget as scratch, registered, and refused
by the configuration when the teacher's weights cannot fit."""

from __future__ import annotations

import pytest

from models.albert import load_albert
from tasks.config import ConfigError, load_config
from tasks.pipeline import SPECS
from tasks.stage import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = ["run.progress=false", "albert.train.max_steps=10", "albert.train.warmup_steps=2",
         "albert.train.checkpoint_every=0", "albert.train.log_every=5"]


def test_teacher_variant_trains_beside_scratch(smoke_stages, tmp_path):
    up = {name: smoke_stages["records"][name] for name in SPECS["albert"].upstream}
    cfg, _ = load_config("smoke", overrides=[*SHORT, "albert.variants=[scratch, teacher]", "albert.init_layer=2"])
    logged: list[dict] = []
    record = run_stage(SPECS["albert"], cfg, tmp_path, up, metrics_sink=lambda m, s: logged.append(m))
    counts, details = record.manifest["counts"], record.manifest["details"]
    assert counts["teacher_steps"] == counts["scratch_steps"] == 10
    init = details["teacher"]["init"]
    assert init["teacher_layer"] == 2 and init["embedding_rank"] == 32  # smoke: E = 32 under the teacher's 64
    assert 0 < counts["teacher_init_svd_relative_error"] < 1
    assert 0 < counts["teacher_val_mlm_accuracy"] < 1 and counts["teacher_train_mlm_loss"] > 0
    assert {"teacher_train_mlm_loss", "teacher_train_sop_loss", "teacher_val_sop_accuracy"} <= {k for m in logged for k in m}
    model = load_albert(record.dir / "teacher" / "model")
    assert model.config.hidden_act == "gelu" and model.config.hidden_size == 64
    assert {"path": "teacher/model", "name": "lightbert-albert-teacher"} in record.manifest["models"]


@pytest.mark.parametrize(("overrides", "words"), [
    (["albert.variants=[teacher]", "albert.hidden_size=32", "albert.num_heads=2"], "albert.hidden_size"),
    (["albert.variants=[teacher]", "albert.embedding_size=128"], "embedding_size"),
    (["albert.variants=[teacher]", "albert.init_layer=3"], "albert.init_layer"),
])
def test_configuration_refuses_a_teacher_variant_that_cannot_fit(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config("smoke", overrides=overrides)
