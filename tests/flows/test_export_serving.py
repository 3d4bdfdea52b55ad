"""The export stage's ONNX models in MLflow: logged with the onnx flavour (their tokenizer beside them),
registered, tagged with their measured metrics under the champion rule, and served by a real
`mlflow models serve -m models:/...@champion --env-manager local` on 127.0.0.1 answering a real request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
from helpers import wait_until_healthy
from transformers import AutoTokenizer

from flows import registry, tracking
from flows.serve import stop_process_group
from tasks.export import formats
from tasks.export import outputs as export

NAME = "lightbert-distilbert-keywords-onnx-int8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registered_onnx_model_is_served_from_its_champion_alias(tiny_export, tmp_path, monkeypatch):
    record = tiny_export["record"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup_tracking(uri, "lightbert", tmp_path)
    with mlflow.start_run():
        registered = dict(tracking.register_models(record))
        assert registered == {f"lightbert-{m}-onnx-{p}": "1" for m in ("teacher", "distilbert-keywords")
                              for p in ("fp32", "int8")}
        again = dict(tracking.register_models(record))  # the same stage output: no new version
    assert again == registered
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "1")
    assert version.tags["lightbert.output_fingerprint"] == record.fingerprint
    outcome = registry.record_evaluation(client, NAME, "1", {"downstream_validation": 0.9, "cpu_latency_ms": 0.5},
                                         protocol={registry.PROTOCOL_TAG: "p1"})
    assert outcome["promoted"] and client.get_model_version(NAME, "1").tags["metric.cpu_latency_ms"] == "0.5"

    model_uri = f"models:/{NAME}@{registry.CHAMPION_ALIAS}"
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "downloaded"))
    flavours = json.dumps(open(os.path.join(local, "MLmodel"), encoding="utf-8").read())
    assert "onnx:" in flavours and "python_function" in flavours
    tok = AutoTokenizer.from_pretrained(os.path.join(local, "extra_files"))  # the tokenizer travels with it

    enc = tok(["the film was lovely", "a dull plot"], padding=True, return_tensors="np")
    feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    info = export.exported_models(record.dir)["lightbert-distilbert-keywords"]
    expected = formats.OrtRunner(export.variant_path(record.dir, info, "onnx-int8") / formats.ONNX_FILE, 1)(feed)

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            # MLflow execs `uvicorn`: the interpreter's own bin/ first on PATH, as in an activated venv
                            env=dict(os.environ, MLFLOW_TRACKING_URI=uri,
                                     PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])),
                            stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/ping", proc, 120, "mlflow models serve")
        body = json.dumps({"inputs": {k: v.tolist() for k, v in feed.items()}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop_process_group(proc)
        log.close()
    logits = np.asarray(answer["predictions"]["logits"], dtype=np.float32)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
