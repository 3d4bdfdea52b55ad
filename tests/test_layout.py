"""The tree's structure, as the README's layout section describes it: one registry of stages from which
every list of stages, sections and model names comes; stages that import no other stage's internals;
an import graph without cycles; presets that hold only what differs from the defaults."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.config import PipelineConfig, load_config, preset_path
from tasks.pipeline import MODEL_NAMES, REGISTERED_NAMES, SPECS, STAGES, STUDENT_NAMES, TRAINING_STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "models")
# What a stage package offers the others: its configuration section and the reader of its output.
PUBLIC_STAGE_MODULES = ("config", "outputs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, dict[str, set[str]]]:
    """{module: {imported module: names imported from it}} over the project's own modules, every import
    counted (also those inside functions: a cycle through a deferred import is still a cycle)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in modules.items():
        edges: dict[str, set[str]] = {}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never imported at run time
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in modules:  # `from tasks.pairs import outputs`: the submodule itself
                        edges.setdefault(target, set())
                    elif base in modules:
                        edges.setdefault(base, set()).add(alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        edges.setdefault(alias.name, set())
        edges.pop(name, None)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, {}):
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") and nxt.count(".") == 1 and nxt in SPEC_PACKAGES:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


SPEC_PACKAGES = {f"tasks.{name}" for name in SPECS}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tasks" and f"tasks.{parts[1]}" in SPEC_PACKAGES else None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": set()}, "b": {}}) is None


def test_no_stage_imports_another_stages_internals():
    """A stage reaches another stage only through its config (its section) and its outputs (the reader
    of what it wrote), and only their public names; its build module is its own."""
    problems = []
    for module, edges in import_graph().items():
        here = stage_of(module)
        for target, names in edges.items():
            there = stage_of(target)
            if there is None or there == here or target == f"tasks.{there}" and not names - {"STAGE"}:
                continue
            if module == "tasks.pipeline" and names == {"STAGE"} or target == f"tasks.{there}" and names <= {"STAGE"}:
                continue
            public = target.split(".")[-1] in PUBLIC_STAGE_MODULES or (target == f"tasks.{there}" and names
                                                                       and all(n in PUBLIC_STAGE_MODULES for n in names))
            private = sorted(n for n in names if n.startswith("_"))
            if not public or private:
                problems.append(f"{module} imports {target} {sorted(names) or ''}")
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_stage_reaching_into_another(tmp_path):
    graph = {"tasks.cache.build": {"tasks.teacher.build": {"load_teacher"}},
             "tasks.distilbert.build": {"tasks.teacher.outputs": {"_private"}}}
    flagged = [m for m, e in graph.items() for t, names in e.items()
               if stage_of(t) != stage_of(m) and (t.split(".")[-1] not in PUBLIC_STAGE_MODULES
                                                  or any(n.startswith("_") for n in names))]
    assert flagged == ["tasks.cache.build", "tasks.distilbert.build"]


def test_every_list_of_stages_and_names_comes_from_the_registry():
    sections = [name for name, spec in SPECS.items() if spec.section is not None]
    assert list(PipelineConfig.model_fields) == ["run", *sections]
    for name in sections:
        assert PipelineConfig.model_fields[name].annotation is SPECS[name].section
    assert STAGES == tuple(SPECS)
    assert TRAINING_STAGES == ("teacher", "distilbert", "albert")
    assert REGISTERED_NAMES == {"teacher": "lightbert-teacher", "distilbert": "lightbert-distilbert",
                                "albert-scratch": "lightbert-albert-scratch",
                                "albert-distilled": "lightbert-albert-distilled",
                                "albert-teacher": "lightbert-albert-teacher"}
    assert MODEL_NAMES[0] == "teacher" and STUDENT_NAMES == MODEL_NAMES[1:]
    for spec in SPECS.values():
        assert set(spec.upstream) <= set(STAGES[: STAGES.index(spec.name)]), f"{spec.name} runs before its upstream"
        assert callable(spec.build_fn()), spec.name
        if spec.training:
            assert spec.training_config(load_config("smoke")[0]).max_steps >= 1


def test_reading_the_registry_and_the_configuration_imports_no_torch():
    code = ("import sys; from tasks.config import load_config; from tasks.pipeline import SPECS; load_config('cpu'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def _same_as_default(raw: dict, default: dict, prefix: str = "") -> list[str]:
    same = []
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            if all(value.get(k) == v for k, v in default[key].items()) and set(value) <= set(default[key]) \
                    and len(value) == len(default[key]) and not prefix.startswith("evaluate.downstream."):
                same.append(f"{prefix}{key}")
            same += _same_as_default(value, default[key], f"{prefix}{key}.")
        elif default.get(key, object()) == value:
            same.append(f"{prefix}{key}")
    return same


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_presets_hold_only_what_differs_from_the_defaults(preset):
    raw = yaml.safe_load(preset_path(preset).read_text(encoding="utf-8"))
    defaults = PipelineConfig().model_dump(mode="json")
    # a family map (epochs, learning rates) is one setting: it may repeat a default beside a changed one
    repeated = [k for k in _same_as_default(raw, defaults) if not k.startswith(("evaluate.downstream.epochs.",
                                                                                "evaluate.downstream.learning_rates."))]
    assert repeated == [], f"data/presets/{preset}.yaml repeats defaults: {repeated}"
