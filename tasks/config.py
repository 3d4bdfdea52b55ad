"""The pipeline's one typed configuration, put together from each stage's own section (declared in
tasks/<stage>/config.py and named by its StageSpec), with presets as YAML under data/presets.

Loading order: preset YAML, then the user's YAML file, then `--set section.key=value` overrides.
Every error names the key, what is wrong with it and how to fix it.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from tasks.pipeline import MODEL_NAMES, SPECS, STUDENT_NAMES
from tasks.section import ConfigError, RunConfig, Section

PRESETS = ("smoke", "cpu", "gpu")


class _Pipeline(Section):
    """The sections: `run`, then each stage's own (tasks/<stage>/config.py), in stage order."""

    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> _Pipeline:
        # Each stage's checks across sections (cache.views against albert.variants, max_seq_len against
        # the positions...): a contradiction fails here, not inside a stage an hour into the run.
        for spec in SPECS.values():
            for check in spec.checks:
                check(self)
        return self

    @staticmethod
    def model_names() -> tuple[str, ...]:
        """The models the pretraining stages save (their specs' models), the teacher first."""
        return MODEL_NAMES

    @staticmethod
    def student_names() -> tuple[str, ...]:
        return STUDENT_NAMES

    def section(self, name: str) -> dict[str, Any]:
        """The JSON-ready dict of one section (what a stage's cache key is made of)."""
        return getattr(self, name).model_dump(mode="json")


# The whole configuration: one field per stage that has a section, named like the stage.
PipelineConfig = create_model(
    "PipelineConfig", __base__=_Pipeline, __module__=__name__,
    **{name: (spec.section, Field(default_factory=spec.section)) for name, spec in SPECS.items() if spec.section},
)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("data.presets").joinpath(f"{name}.yaml")))


def default_preset() -> str:
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (corpus:, pairs:, ...)")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set pairs.max_seq_len=64")
    dotted, raw = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if len(keys) < 2:
        raise ConfigError(f"--set {item!r}: name a section and a key, e.g. --set tokenizer.vocab_size=4000")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[keys[-1]] = value


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that `loc` (minus its last part) points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return sorted(getattr(current, "model_fields", {}))


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _known_keys(PipelineConfig, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            elsewhere = [f"{name}.{loc[-1]}" for name, f in PipelineConfig.model_fields.items()
                         if isinstance(f.annotation, type) and str(loc[-1]) in f.annotation.model_fields]
            fix = f"did you mean '{hint[0]}'? " if hint else (
                f"It belongs under {' or '.join(elsewhere)}. " if elsewhere else "")
            lines.append(f"{dotted}: unknown key. {fix}Known keys here: {', '.join(known)}")
        elif kind in ("int_parsing", "int_type", "float_parsing", "float_type", "bool_parsing", "bool_type",
                      "string_type", "int_from_float", "list_type", "dict_type", "model_type"):
            got = err.get("input")
            lines.append(f"{dotted}: {err['msg'].lower()}, got {got!r} ({type(got).__name__}); "
                         f"set it to a value of the right type")
        elif kind == "literal_error":
            lines.append(f"{dotted}: {err['msg']}, got {err.get('input')!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = f" (got {got!r})" if kind.startswith(("greater", "less")) else ""
            lines.append(f"{dotted}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[PipelineConfig, str]:
    """Resolve preset + file + overrides into a validated configuration; returns it and the preset."""
    preset = preset or default_preset()
    data = _read_yaml(preset_path(preset))
    if config_file is not None:
        data = _deep_merge(data, _read_yaml(Path(config_file)))
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(data, keys, value)
    return validate_config(data), preset


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved_config(cfg: PipelineConfig, workdir: Path) -> Path:
    """Write the configuration a run actually used to <workdir>/config.yaml."""
    from tasks.artifacts import atomic_write_text

    path = Path(workdir) / "config.yaml"
    atomic_write_text(path, dump_config(cfg))
    return path
