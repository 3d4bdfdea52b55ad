"""tasks/albert/ through tasks.stage.run_stage on the smoke preset's stages (teacher, cache with the
SOP view, pairs), both variants; the cache.views check; the Wilson interval."""

from __future__ import annotations

import math
import shutil

import pytest
from transformers import AlbertForMaskedLM, AutoModelForMaskedLM, AutoTokenizer

from models.albert import count_parameters, load_albert
from tasks.albert import build as albert
from tasks.artifacts import sha256_json
from tasks.config import ConfigError, load_config
from tasks.pipeline import SPECS
from tasks.stage import PARTIAL, StageError, cache_key_parts, read_manifest, run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = ["run.progress=false", "albert.train.max_steps=40", "albert.train.warmup_steps=4",
         "albert.train.checkpoint_every=20", "albert.train.log_every=10"]


def upstream(smoke_stages) -> dict:
    return {name: smoke_stages["records"][name] for name in SPECS["albert"].upstream}


def test_wilson_interval():
    low, high = albert.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = albert.wilson_interval(20, 20)  # all right: the interval still admits mistakes
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-4)


def test_stage_trains_and_saves_both_variants(smoke_stages, tmp_path):
    # hidden 32 under the smoke teacher's 64: the distilled variant's Lcos goes through the projection
    cfg, _ = load_config("smoke", overrides=[*SHORT, "albert.hidden_size=32", "albert.num_heads=2",
                                             "albert.intermediate_size=64", "albert.embedding_size=16"])
    assert "sop" in cfg.cache.views  # the smoke preset caches the SOP view
    record = run_stage(SPECS["albert"], cfg, tmp_path, upstream(smoke_stages))
    counts = record.manifest["counts"]
    vocab = smoke_stages["config"].tokenizer.vocab_size
    for variant in ("scratch", "distilled"):
        assert counts[f"{variant}_steps"] == 40
        assert counts[f"{variant}_train_tokens_per_s"] > 0
        low, acc, high = (counts[f"{variant}_val_sop_{k}"] for k in ("ci_low", "accuracy", "ci_high"))
        assert 0 <= low <= acc <= high <= 1
        assert 0.5 <= counts[f"{variant}_val_sop_majority_accuracy"] <= 1
        assert 0 < counts[f"{variant}_val_mlm_accuracy"] < 1
        assert counts[f"{variant}_train_mlm_loss"] < math.log(vocab)  # it learned something
        model_dir = record.dir / variant / "model"
        assert not (record.dir / variant / "checkpoints").exists()
        model = load_albert(model_dir)
        assert count_parameters(model) == counts[f"{variant}_parameters"]
        assert model.config.hidden_size == 32 and model.config.embedding_size == 16
        mlm = AutoModelForMaskedLM.from_pretrained(model_dir)
        assert isinstance(mlm, AlbertForMaskedLM)
        assert AutoTokenizer.from_pretrained(model_dir).mask_token == "[MASK]"
    assert {"ce_loss", "cos_loss", "sop_loss", "mlm_loss"} <= {k.removeprefix("distilled_train_") for k in counts}
    assert counts["distilled_projection_parameters"] == 32 * 64 + 64
    assert record.manifest["models"] == [{"path": "scratch/model", "name": "lightbert-albert-scratch"},
                                         {"path": "distilled/model", "name": "lightbert-albert-distilled"}]
    assert read_manifest(record.dir)["details"]["sharing"] == "all"

    # the same command again reuses the finished stage
    again = run_stage(SPECS["albert"], cfg, tmp_path, upstream(smoke_stages))
    assert again.cached

    # A stage killed during its second variant left the first one finished in its partial directory:
    # the rerun keeps it and trains only the second.
    other = tmp_path / "killed"
    key = sha256_json(cache_key_parts(SPECS["albert"], cfg, upstream(smoke_stages)))
    shutil.copytree(record.dir / "scratch", other / PARTIAL / f"albert-{key[:16]}" / "scratch")
    resumed = run_stage(SPECS["albert"], cfg, other, upstream(smoke_stages))
    assert resumed.manifest["resumed"]
    assert resumed.manifest["details"]["scratch"]["kept_from_interrupted_attempt"]
    assert "kept_from_interrupted_attempt" not in resumed.manifest["details"]["distilled"]
    assert resumed.manifest["counts"]["scratch_val_sop_accuracy"] == counts["scratch_val_sop_accuracy"]


def test_distilled_variant_needs_the_sop_view_in_the_cache(smoke_stages, tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.views"):  # refused when the configuration is read
        load_config("smoke", overrides=[*SHORT, "cache.views=[nsp]"])
    cfg, _ = load_config("smoke", overrides=SHORT)
    cfg.cache.views = ["nsp"]  # past the configuration's checks: the stage itself still refuses
    with pytest.raises(StageError, match=r"cache\.views"):
        run_stage(SPECS["albert"], cfg, tmp_path, upstream(smoke_stages))
