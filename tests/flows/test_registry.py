"""The champion rule on a real sqlite MLflow registry: metrics as tags, the alias moves only on a win on
the validation metric, and only between versions evaluated under the same protocol."""

from __future__ import annotations

import pytest

from flows.registry import (
    CHAMPION_ALIAS,
    FINGERPRINT_TAG,
    METRIC_NAME_TAG,
    PROMOTED_TAG,
    REASON_TAG,
    record_evaluation,
    version_for_fingerprint,
)

NAME = "lightbert-distilbert"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite store with one run holding a tiny artifact; returns (client, new_version())."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.create_experiment("lightbert", artifact_location=(root / "mlruns").as_uri())
    run_id = client.create_run(exp).info.run_id
    (root / "weights.txt").write_text("not really a model\n")
    client.log_artifact(run_id, str(root / "weights.txt"), "model")
    client.create_registered_model(NAME)

    def new_version(fingerprint: str) -> str:
        v = client.create_model_version(NAME, source=f"runs:/{run_id}/model", run_id=run_id,
                                        tags={FINGERPRINT_TAG: fingerprint})
        return str(v.version)

    return client, new_version


def _champion(client) -> str | None:
    alias = client.get_registered_model(NAME).aliases.get(CHAMPION_ALIAS)
    return None if alias is None else str(alias)


def test_champion_moves_only_to_a_strictly_better_version(registry):
    client, new_version = registry
    v1, v2, v3, v4 = (new_version(f"fp-{i}") for i in range(1, 5))

    first = record_evaluation(client, NAME, v1, {"downstream_validation": 0.70, "mlm_accuracy": 0.41})
    assert first["promoted"] and first["previous_champion_version"] is None
    assert _champion(client) == v1
    tags = client.get_model_version(NAME, v1).tags
    assert tags["metric.downstream_validation"] == "0.7" and tags["metric.mlm_accuracy"] == "0.41"
    assert tags[PROMOTED_TAG] == "true" and "no champion yet" in tags[REASON_TAG]
    assert client.get_registered_model(NAME).tags[METRIC_NAME_TAG] == "downstream_validation"

    worse = record_evaluation(client, NAME, v2, {"downstream_validation": 0.65})
    assert not worse["promoted"] and _champion(client) == v1
    assert worse["previous_champion_version"] == v1 and worse["previous_champion_value"] == 0.70
    assert worse["champion_version"] == v1
    tags = client.get_model_version(NAME, v2).tags
    assert tags[PROMOTED_TAG] == "false" and tags[REASON_TAG].startswith("downstream_validation=0.65 is below")

    tie = record_evaluation(client, NAME, v3, {"downstream_validation": 0.70})
    assert not tie["promoted"] and _champion(client) == v1 and "ties" in tie["reason"]

    better = record_evaluation(client, NAME, int(v4), {"downstream_validation": 0.72})
    assert better["promoted"] and _champion(client) == v4
    assert better["previous_champion_version"] == v1 and better["champion_version"] == v4
    assert client.get_model_version(NAME, v4).tags[PROMOTED_TAG] == "true"

    # Re-recording the champion (even with a lower score) leaves the alias and its decision tags alone.
    again = record_evaluation(client, NAME, v4, {"downstream_validation": 0.60})
    assert not again["promoted"] and again["champion_version"] == v4 and _champion(client) == v4
    assert "already the champion" in again["reason"]
    tags = client.get_model_version(NAME, v4).tags
    assert tags["metric.downstream_validation"] == "0.6" and tags[PROMOTED_TAG] == "true"

    # The versions the evaluate stage scored are found by their stage output's fingerprint.
    assert version_for_fingerprint(client, NAME, "fp-3") == v3
    assert version_for_fingerprint(client, NAME, "fp-unknown") is None


def test_a_champion_without_the_metric_is_beaten_and_a_missing_value_never_wins(registry):
    client, new_version = registry
    client.delete_registered_model_alias(NAME, CHAMPION_ALIAS)
    old, unscored, scored = new_version("fp-old"), new_version("fp-unscored"), new_version("fp-scored")
    client.set_registered_model_alias(NAME, CHAMPION_ALIAS, old)  # set by hand, never evaluated

    missing = record_evaluation(client, NAME, unscored, {"mlm_accuracy": 0.5})
    assert not missing["promoted"] and _champion(client) == old
    nan = record_evaluation(client, NAME, unscored, {"downstream_validation": float("nan")})
    assert not nan["promoted"] and _champion(client) == old

    beaten = record_evaluation(client, NAME, scored, {"downstream_validation": 0.1})
    assert beaten["promoted"] and beaten["previous_champion_value"] is None and _champion(client) == scored


def test_the_champion_only_moves_between_versions_of_the_same_protocol(registry):
    from flows.registry import PROTOCOL_TAG

    client, new_version = registry
    client.delete_registered_model_alias(NAME, CHAMPION_ALIAS)
    first, other, same = new_version("fp-p1"), new_version("fp-p2"), new_version("fp-p3")
    protocol = {PROTOCOL_TAG: "aaaa", "lightbert.protocol.seeds": "1"}
    assert record_evaluation(client, NAME, first, {"downstream_validation": 0.80}, protocol=protocol)["promoted"]
    assert client.get_model_version(NAME, first).tags[PROTOCOL_TAG] == "aaaa"
    # far better, but measured under another protocol (other seeds, say): not comparable, the alias stays
    moved = record_evaluation(client, NAME, other, {"downstream_validation": 0.95},
                              protocol={PROTOCOL_TAG: "bbbb", "lightbert.protocol.seeds": "1,2"})
    assert not moved["promoted"] and _champion(client) == first
    assert "not comparable" in moved["reason"] and "aaaa" in moved["reason"] and "bbbb" in moved["reason"]
    # better under the same protocol: promoted
    assert record_evaluation(client, NAME, same, {"downstream_validation": 0.81}, protocol=protocol)["promoted"]
    assert _champion(client) == same
