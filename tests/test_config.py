"""Configuration: presets load, overrides apply, and bad input gets a message naming key and fix."""

from __future__ import annotations

import pytest
import yaml

from tasks.config import PRESETS, ConfigError, PipelineConfig, load_config, save_resolved_config


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates(preset):
    cfg, name = load_config(preset)
    assert name == preset
    assert cfg.pairs.max_seq_len <= cfg.teacher.max_position_embeddings


def test_the_methods_run_configuration_asks_for_every_row_the_readme_reports():
    """benchmarks/methods.yaml (the README's one run with every ablation row) still validates over the cpu
    preset and asks for the paper's rows, the layer map, matches on/off and the three ALBERT variants."""
    from pathlib import Path

    from tasks.distilbert.config import TABLE4_ROWS

    cfg, _ = load_config("cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "methods.yaml")
    rows = cfg.distilbert.ablation_rows()
    assert set(TABLE4_ROWS) <= set(rows) and {"layer_map_hf", "no_inter"} <= set(rows)
    assert {m.feature for m in cfg.distilbert.matches} == {"hidden", "attention"} and cfg.distilbert.mode == "cached"
    assert cfg.albert.variants == ["scratch", "distilled", "teacher"]


def test_gpu_preset_teacher_has_bert_base_shape():
    cfg, _ = load_config("gpu")
    t = cfg.teacher
    assert (t.num_layers, t.hidden_size, t.num_heads, t.intermediate_size) == (12, 768, 12, 3072)


def test_file_then_overrides_are_merged_over_the_preset(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text(yaml.safe_dump({"pairs": {"dupe_factor": 7}, "tokenizer": {"vocab_size": 3000}}))
    cfg, _ = load_config("smoke", f, ["tokenizer.vocab_size=4000", "corpus.sources=[bbc-news]"])
    assert cfg.pairs.dupe_factor == 7  # from the file
    assert cfg.tokenizer.vocab_size == 4000  # --set wins over the file
    assert cfg.pairs.max_seq_len == 64  # untouched preset value
    assert [s.name for s in cfg.corpus.sources] == ["bbc-news"]


def _error(*overrides, preset="smoke", config=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, config, list(overrides))
    return str(info.value)


def test_unknown_key_is_named_with_a_suggestion():
    msg = _error("pairs.max_seq_length=64")
    assert "pairs.max_seq_length: unknown key" in msg
    assert "did you mean 'max_seq_len'" in msg


def test_key_in_the_wrong_section_points_to_the_right_one():
    msg = _error("corpus.vocab_size=100")
    assert "corpus.vocab_size" in msg and "tokenizer.vocab_size" in msg


def test_wrong_type_names_key_and_value():
    msg = _error("pairs.max_seq_len=long")
    assert "pairs.max_seq_len" in msg and "'long'" in msg and "integer" in msg


def test_impossible_values_are_refused():
    msg = _error("pairs.max_seq_len=1024")  # smoke: a teacher trained here, 128 positions
    assert "pairs.max_seq_len (1024)" in msg and "teacher.max_position_embeddings" in msg
    assert "pairs.mask_prob" in _error("pairs.mask_prob=1.5")
    assert "hidden_size" in _error("teacher.num_heads=3")
    assert "exactly one of name, path, url or hf" in _error("corpus.sources=[{path: a, url: 'http://x'}]")
    assert "at least one source" in _error("corpus.sources=[]")


def test_bad_preset_file_and_override_syntax():
    assert "unknown preset 'huge'" in _error(preset="huge")
    assert "section.key=value" in _error("pairs.max_seq_len")
    assert "does not exist" in _error(config="/nonexistent/lightbert.yaml")


def test_resolved_config_is_saved_and_reloads_identically(tmp_path):
    cfg, _ = load_config("smoke", overrides=["pairs.dupe_factor=3"])
    path = save_resolved_config(cfg, tmp_path)
    again, _ = load_config("cpu", path)  # a saved config fully determines the run, whatever the preset
    assert again == cfg


def test_the_default_configuration_is_valid_end_to_end():
    """Every stage's checks across sections pass on the defaults (the default cache holds the SOP view the
    default ALBERT-distilled reads)."""
    from tasks.pipeline import SPECS

    cfg = PipelineConfig()
    for spec in SPECS.values():
        for check in spec.checks:
            check(cfg)
    assert "sop" in cfg.cache.views and "distilled" in cfg.albert.variants


@pytest.mark.parametrize(("overrides", "named"), [
    (["cache.views=[nsp]"], ["albert.variants", "cache.views", "--set cache.views=[nsp,sop]"]),
    (["cache.splits=[validation]", "albert.variants=[scratch]"], ["distilbert.mode", "cache.splits"]),
    (["distilbert.cos_layers=mapped", "distilbert.num_layers=2"], ["cache.hidden_layers: mapped", "distilbert.cos_layers"]),
    (["evaluate.models=[teacher, albert-big]"], ["evaluate.models", "albert-big", "albert-distilled"]),
    (["pairs.max_seq_len=256"], ["pairs.max_seq_len", "teacher.max_position_embeddings"]),
])
def test_a_contradiction_between_sections_fails_at_lightbert_config(overrides, named):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["config", "--preset", "smoke", *(a for o in overrides for a in ("--set", o))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in named:
        assert text in result.output, (text, result.output)
