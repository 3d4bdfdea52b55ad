"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage.

Stages know nothing of MLflow; this module turns a finished StageRecord (its manifest) into params,
metrics, tags, small artifacts and dataset inputs. Large outputs are referenced by path and
fingerprint, never copied into the artifact store.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, dump_config
from tasks.stage import StageRecord, code_version

PARAM_BATCH = 100
PARAM_MAX_LEN = 6000
TAG_MAX_LEN = 5000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind: opens on the runs
WORKDIR_TAG = "lightbert.workdir"
HOST_TAG = "lightbert.host"
RESUMED_BY_TAG = "lightbert.resumed_by"  # on a run a killed pipeline run left RUNNING: the run that closed it
CLOSED_RUNS_TAG = "lightbert.closed_runs"  # on a parent run: the runs it closed (comma-separated ids)
RESUMED_FROM_TAG = "lightbert.resumed_from"  # on a parent run: the killed parent runs it closed



def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def _mlflow():
    # Imported late: MLflow's import costs seconds, and `lightbert --help` should not pay it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    return mlflow


def setup_tracking(tracking_uri: str, experiment: str, workdir: Path) -> str:
    """Point MLflow at the store; create the experiment (artifacts under the workdir) if needed."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:"):
            # The default would be ./mlruns of whatever directory the user ran from.
            location = (Path(workdir).resolve() / "mlruns").as_uri()
        exp_id = mlflow.create_experiment(experiment, artifact_location=location, tags={
            # Opens in the UI's model-training view (runs, metrics, models), not its GenAI view.
            EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
            "mlflow.note.content": "lightbert pipeline runs: one parent run per `lightbert run`, "
                                   "a nested run per stage.",
        })
    else:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment made elsewhere; a kind chosen in the UI stays
            mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """{"pairs": {"max_seq_len": 128}} -> {"pairs.max_seq_len": "128"} (lists kept as JSON)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
        out[prefix.rstrip(".")] = text[:PARAM_MAX_LEN]
    return out


def _log_params(params: dict[str, str]) -> None:
    mlflow = _mlflow()
    items = list(params.items())
    for i in range(0, len(items), PARAM_BATCH):
        mlflow.log_params(dict(items[i : i + PARAM_BATCH]))


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig, workdir: Path, preset: str, until: str | None,
                 tracking_uri: str | None) -> Iterator[str]:
    """The parent run of one pipeline run; yields its run id."""
    mlflow = _mlflow()
    uri = tracking_uri or default_tracking_uri(workdir)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; a later run in this process (a served
    # deployment, a test) must not inherit this run's store as its default.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    setup_tracking(uri, cfg.run.experiment, workdir)
    name = f"pipeline-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        with mlflow.start_run(run_name=name) as run:
            mlflow.set_tags({
                "lightbert.kind": "pipeline",
                "lightbert.preset": preset,
                "lightbert.until": until or "all",
                "lightbert.code_version": code_version(),
                "lightbert.pid": str(os.getpid()),
                WORKDIR_TAG: str(Path(workdir).resolve()),
                HOST_TAG: socket.gethostname(),
            })
            _log_params(flatten(cfg.model_dump(mode="json")))
            mlflow.log_text(dump_config(cfg), "config.yaml")
            yield run.info.run_id
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _inherited_tags(parent_run_id: str) -> dict[str, str]:
    """The workdir and host tags of a parent run, which its nested runs carry too."""
    tags = _mlflow().MlflowClient().get_run(parent_run_id).data.tags
    return {k: tags[k] for k in (WORKDIR_TAG, HOST_TAG) if k in tags}


@contextlib.contextmanager
def stage_run(stage: str, parent_run_id: str) -> Iterator[str]:
    """A nested run for one stage; marked FAILED by MLflow if the block raises."""
    mlflow = _mlflow()
    inherited = _inherited_tags(parent_run_id)
    with mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id) as run:
        mlflow.set_tags({"lightbert.stage": stage, **inherited})
        yield run.info.run_id


def close_abandoned_runs(workdir: Path, resumed_by: str) -> list[str]:
    """Mark KILLED the runs that an earlier, dead pipeline run of this workdir left RUNNING; returns
    their ids (parents first).

    Call it only while holding the workdir lock (tasks/stage.py `workdir_lock`): a run holds that lock
    for its whole life, so once this process has it, no other process on this host runs this workdir,
    and a RUNNING run of it is one whose process was killed (kill -9, OOM, power loss) before MLflow
    could end it. Runs of this workdir are those tagged with it (lightbert.workdir) and this host
    (lightbert.host; another host's lock is not ours), in the current experiment, plus every RUNNING
    run nested under one of them (ablation runs, stage runs of older versions without the tags). Each
    closed run is tagged lightbert.resumed_by = `resumed_by`; the run `resumed_by` is tagged with what
    it closed (lightbert.closed_runs, and lightbert.resumed_from for the killed parent runs).
    """
    mlflow = _mlflow()
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(resumed_by).info.experiment_id
    running, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        running.extend(r for r in page if r.info.run_id != resumed_by)
        token = page.token
        if not token:
            break
    wd, host = str(Path(workdir).resolve()), socket.gethostname()
    dead = [r for r in running if r.data.tags.get(WORKDIR_TAG) == wd and r.data.tags.get(HOST_TAG, host) == host]
    chosen = {r.info.run_id for r in dead}
    grown = True
    while grown:  # nested runs of a dead run, at any depth
        more = [r for r in running if r.info.run_id not in chosen
                and r.data.tags.get("mlflow.parentRunId") in chosen]
        dead += more
        chosen |= {r.info.run_id for r in more}
        grown = bool(more)
    dead.sort(key=lambda r: ("mlflow.parentRunId" in r.data.tags, r.info.start_time or 0))
    for r in dead:
        client.set_tag(r.info.run_id, RESUMED_BY_TAG, resumed_by)
        note = r.data.tags.get("mlflow.note.content", "")[:TAG_MAX_LEN]
        client.set_tag(r.info.run_id, "mlflow.note.content", (
            f"{note}\n\n" if note else "") + f"Killed: its process died while RUNNING; closed by run "
            f"{resumed_by}, the next run on {wd}, which resumed its work.")
        client.set_terminated(r.info.run_id, status="KILLED")
    ids = [r.info.run_id for r in dead]
    if ids:
        parents = [r.info.run_id for r in dead if r.data.tags.get("lightbert.kind") == "pipeline"]
        client.set_tag(resumed_by, CLOSED_RUNS_TAG, ",".join(ids)[:TAG_MAX_LEN])
        if parents:
            client.set_tag(resumed_by, RESUMED_FROM_TAG, ",".join(parents)[:TAG_MAX_LEN])
    return ids


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def _dataset_fingerprint(manifest: dict[str, Any], rel: str) -> str:
    """Fingerprint of one dataset directory of a stage, from the manifest's file hashes."""
    from tasks.artifacts import sha256_json

    prefix = rel.rstrip("/") + "/"
    files = {k: v for k, v in manifest.get("files", {}).items() if k.startswith(prefix)}
    return sha256_json(files)


def _log_datasets(record: StageRecord, context: str) -> None:
    mlflow = _mlflow()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for rel in record.manifest.get("datasets", []):
        path = (record.dir / rel).resolve()
        with warnings.catch_warnings():  # "file:" matches two equivalent registered source classes
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(path.as_uri())
        dataset = MetaDataset(
            source=source,
            name=f"{record.name}/{rel}",
            digest=_dataset_fingerprint(record.manifest, rel)[:16],
        )
        mlflow.log_input(dataset, context=context)


def log_stage(record: StageRecord, upstream: dict[str, StageRecord]) -> None:
    """Everything a stage run shows in the UI, for a built stage and a reused one alike."""
    mlflow = _mlflow()
    manifest = record.manifest
    produced_by = manifest.get("produced_by", {}).get("mlflow_run_id", "")
    mlflow.set_tags({
        "lightbert.cached": str(record.cached).lower(),
        "lightbert.reason": record.reason[:5000],
        "lightbert.output_dir": str(record.dir),
        "lightbert.output_fingerprint": record.fingerprint,
        "lightbert.cache_key": manifest.get("cache_key", ""),
        "lightbert.code_version": manifest.get("code_version", ""),
        "lightbert.produced_by_run": produced_by,
    })
    provenance = manifest.get("details", {}).get("provenance") or {}
    if provenance:  # where a pretrained model came from, searchable in the UI
        mlflow.set_tags({f"lightbert.provenance.{k}": str(v)[:5000] for k, v in flatten(provenance).items()})
        for key in ("mlm_head", "pooling", "can_teach_note"):
            if manifest["details"].get(key) is not None:
                mlflow.set_tag(f"lightbert.teacher.{key}", str(manifest["details"][key])[:5000])
    if record.cached:
        mlflow.set_tag("mlflow.note.content",
                       f"Reused from the cache: the output in {record.dir} was produced by run "
                       f"{produced_by or '(unknown)'} and still matches its manifest.")
    _log_params(flatten(manifest.get("config", {})))
    seconds = float(manifest.get("timings", {}).get("seconds", 0.0))
    metrics = {k: float(v) for k, v in manifest.get("counts", {}).items() if isinstance(v, int | float)}
    metrics["stage_seconds"] = seconds
    metrics["cached"] = float(record.cached)
    log_metrics(metrics)
    for up in upstream.values():
        _log_datasets(up, context="input")
    _log_datasets(record, context="output")
    mlflow.log_artifact(str(record.dir / "manifest.json"))
    for rel in manifest.get("artifacts", []):
        path = record.dir / rel
        if path.is_file():
            parent = str(Path("outputs") / Path(rel).parent) if Path(rel).parent != Path(".") else "outputs"
            mlflow.log_artifact(str(path), artifact_path=parent)


def _pip_requirements() -> list[str]:
    # MLflow's inferred requirements name torchvision, which has no CPU build here (STACK.md).
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("transformers", "tokenizers", "safetensors")] + [
        f"torch>={version('torch').split('+')[0]}"]


def registry_view(path: Path, task: str | None):
    """(model, pipeline task) a registry user loads: a task model as its classifier (text-classification);
    a checkpoint with an MLM head as a masked LM (fill-mask; a pretraining checkpoint's NSP/SOP head is
    dropped); a bare encoder (a headless teacher) as feature-extraction, never with a random head."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    if task == "text-classification":
        return AutoModelForSequenceClassification.from_pretrained(path), task
    if task == "feature-extraction" or (AutoConfig.from_pretrained(path).architectures or []) in (
            ["BertModel"], ["DistilBertModel"], ["AlbertModel"]):
        return AutoModel.from_pretrained(path), "feature-extraction"
    return AutoModelForMaskedLM.from_pretrained(path), "fill-mask"


def log_onnx_model(folder: Path, entry: dict[str, Any], name: str):
    """An exported ONNX model (tasks/export/) logged with MLflow's onnx flavour and registered as `name`: its
    tokenizer files travel with it (extra_files), and its signature takes int64 tensors of any batch and
    sequence length (the export's dynamic axes), answering the exported output (logits or hidden states)."""
    from importlib.metadata import version

    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from tasks.export.outputs import ONNX_FILE

    inputs = entry["inputs"].split(",")
    shape = (-1, -1) if entry.get("task") == "text-classification" else (-1, -1, -1)  # logits, hidden states
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), n) for n in inputs]),
                               outputs=Schema([TensorSpec(np.dtype("float32"), shape, entry["output"])]))
    return _mlflow().onnx.log_model(
        onnx.load(str(folder / ONNX_FILE)), name=entry.get("artifact", name), registered_model_name=name,
        signature=signature, onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
        extra_files=[str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != ONNX_FILE],
        pip_requirements=[f"onnx=={version('onnx')}", f"onnxruntime=={version('onnxruntime')}"])


def register_models(record: StageRecord) -> list[tuple[str, str]]:
    """Log each model a stage saved into MLflow's registry: as a transformers model (see registry_view), or
    an export stage's ONNX model with the onnx flavour (log_onnx_model).

    A version is created once per stage output: a reused stage whose output fingerprint is already
    registered under that name adds nothing. Returns [(name, version)].
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    registered = []
    for entry in record.manifest.get("models", []):
        name, path = entry["name"], record.dir / entry["path"]
        existing = [v for v in client.search_model_versions(f"name='{name}'")
                    if v.tags.get("lightbert.output_fingerprint") == record.fingerprint]
        if existing:
            registered.append((name, str(existing[0].version)))
            continue
        if entry.get("flavor") == "onnx":
            info = log_onnx_model(path, entry, name)
        else:
            model, task = registry_view(path, entry.get("task"))
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer}, name=entry.get("artifact", name),
                task=task, registered_model_name=name, pip_requirements=_pip_requirements(),
            )
        version = str(info.registered_model_version)
        for key, value in {"lightbert.output_fingerprint": record.fingerprint,
                           "lightbert.stage": record.name, "lightbert.path": str(path)}.items():
            client.set_model_version_tag(name, version, key, value)
        mlflow.set_tag(f"lightbert.registered.{name}", version)
        registered.append((name, version))
    return registered


def log_ablations(record: StageRecord, stage_run_id: str) -> None:
    """A stage's ablation rows (details["ablations"]: [{"row": name, metric: value, ...}]) become
    nested runs under the stage's run, and one table of them on the stage's run."""
    rows = record.manifest.get("details", {}).get("ablations") or []
    if not rows:
        return
    mlflow = _mlflow()
    for row in rows:
        name = str(row.get("row", "row"))
        with mlflow.start_run(run_name=f"{record.name}/{name}", nested=True, parent_run_id=stage_run_id):
            mlflow.set_tags({"lightbert.stage": record.name, "lightbert.ablation": name,
                             "lightbert.cached": str(record.cached).lower(), **_inherited_tags(stage_run_id)})
            mlflow.log_params({k: str(v)[:PARAM_MAX_LEN] for k, v in row.items()
                               if not isinstance(v, int | float) or isinstance(v, bool)})
            log_metrics({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "row", k))
    mlflow.log_table({c: [row.get(c) for row in rows] for c in columns}, artifact_file="ablations.json")


def record_evaluations(record: StageRecord) -> list[dict[str, Any]]:
    """The evaluate stage's scores onto the registry: each scored model's version (the one registered
    for the stage output it came from) gets its metrics and protocol as tags, and alias `champion` moves
    to it when it beats the current champion on the validation metric under the same protocol
    (flows/registry.py). Other stages: nothing."""
    from flows import registry

    entries = record.manifest.get("details", {}).get("registry") or []
    if not entries:
        return []
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    outcomes = []
    for entry in entries:
        version = registry.version_for_fingerprint(client, entry["name"], entry["fingerprint"])
        if version is None:  # registered by its stage in every run; absent only if that failed
            mlflow.set_tag(f"lightbert.champion.{entry['name']}", "not registered: no version to tag")
            continue
        outcome = registry.record_evaluation(client, entry["name"], version, entry["metrics"],
                                             protocol=entry.get("protocol"))
        mlflow.set_tag(f"lightbert.champion.{entry['name']}",
                       f"v{version} {'promoted' if outcome['promoted'] else 'not promoted'}: {outcome['reason']}"[:5000])
        outcomes.append(outcome)
    return outcomes
