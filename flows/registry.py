"""Model-registry bookkeeping: evaluation metrics as model-version tags, and the `champion` alias.

The rule: alias `champion` of a registered model moves to a newly evaluated version only when that
version beats the current champion on one metric (default `downstream_validation`: the validation
metric, so the test split never picks a model; higher is better), and only when both were evaluated
under the same protocol (tag `lightbert.protocol`: a fingerprint of the tasks, their metrics, the budget
and the seeds). A version evaluated under another protocol than the champion's is not comparable: the
alias stays, and the version's tags say why (move it by hand with `MlflowClient.set_registered_model_alias`
once you decide the new protocol is the one to judge by). Ties keep the old champion, so re-running an
evaluation never moves the alias back and forth.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION_ALIAS = "champion"
METRIC_TAG_PREFIX = "metric."  # metric `x` of a version is its tag `metric.x`
FINGERPRINT_TAG = "lightbert.output_fingerprint"  # set by flows.tracking.register_models
PROMOTED_TAG = "lightbert.champion.promoted"  # "true" / "false": the outcome of the last evaluation
REASON_TAG = "lightbert.champion.reason"  # why it was (or was not) promoted, in words
METRIC_NAME_TAG = "lightbert.champion.metric"  # on the registered model: the metric that decides
PROTOCOL_TAG = "lightbert.protocol"  # what the metrics were measured under (tasks, metric, budget, seeds)


def metric_tag(metric: str) -> str:
    return f"{METRIC_TAG_PREFIX}{metric}"


def version_for_fingerprint(client: MlflowClient, name: str, fingerprint: str) -> str | None:
    """The version of `name` registered for the stage output with this fingerprint (the newest if
    several), or None."""
    versions = [v for v in client.search_model_versions(f"name='{name}'")
                if v.tags.get(FINGERPRINT_TAG) == fingerprint]
    if not versions:
        return None
    return str(max(int(v.version) for v in versions))


def _tagged_metric(tags: dict[str, str], metric: str) -> float | None:
    """A finite metric value from a version's tags, or None when it is missing or unreadable."""
    try:
        value = float(tags[metric_tag(metric)])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def record_evaluation(client: MlflowClient, name: str, version: str | int, metrics: dict[str, float],
                      champion_metric: str = "downstream_validation",
                      protocol: dict[str, str] | None = None) -> dict[str, Any]:
    """Tag version `version` of `name` with every metric (`metric.<name>`) and the protocol tags, then
    move alias `champion` to it when it beats the current champion on `champion_metric` under the same
    protocol (`protocol[PROTOCOL_TAG]`).

    Promoted when: the model has no champion yet; or the champion's tags lack a finite value of the
    metric; or this version's value is strictly greater. Never across protocols: a champion evaluated
    under another protocol keeps the alias. A version that already is the champion stays champion (only
    its tags are refreshed); a tie, or a version without a finite value of the metric, leaves the alias
    where it is. The decision is written on the version
    (`lightbert.champion.promoted`: true/false; `lightbert.champion.reason`: why, in words).

    Returns {"name", "version", "metric", "value", "promoted", "champion_version",
    "previous_champion_version", "previous_champion_value", "reason"} for the caller to log.
    """
    version = str(version)
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, metric_tag(key), repr(float(value)))
    for key, value in (protocol or {}).items():
        client.set_model_version_tag(name, version, key, value)
    mine = (protocol or {}).get(PROTOCOL_TAG)
    client.set_registered_model_tag(name, METRIC_NAME_TAG, champion_metric)

    value = metrics.get(champion_metric)
    value = float(value) if value is not None and math.isfinite(float(value)) else None
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    previous = aliases.get(CHAMPION_ALIAS)
    previous_value, previous_protocol = None, None
    if previous is not None:
        previous_tags = client.get_model_version(name, previous).tags
        previous_value = _tagged_metric(previous_tags, champion_metric)
        previous_protocol = previous_tags.get(PROTOCOL_TAG)

    shown = f"{champion_metric}={value:.6g}" if value is not None else f"no finite {champion_metric}"
    if previous == version:
        promoted, reason = False, f"already the champion ({shown})"
    elif previous is None:
        promoted, reason = True, f"first evaluated version: no champion yet ({shown})"
    elif value is None:
        promoted, reason = False, f"{shown}: cannot beat champion version {previous}"
    elif previous_protocol != mine:
        promoted, reason = False, (f"{shown}, but champion version {previous} was evaluated under protocol "
                                   f"{previous_protocol or '(none)'} and this version under {mine or '(none)'}: not "
                                   "comparable, the alias stays (move it by hand to adopt the new protocol)")
    elif previous_value is None:
        promoted, reason = True, f"{shown}; champion version {previous} had no {champion_metric}"
    elif value > previous_value:
        promoted, reason = True, f"{shown} beats champion version {previous} ({previous_value:.6g})"
    else:
        relation = "ties" if value == previous_value else "is below"
        promoted, reason = False, f"{shown} {relation} champion version {previous} ({previous_value:.6g})"

    if promoted:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    if previous != version:  # the champion's own tags already say why it is the champion
        client.set_model_version_tag(name, version, PROMOTED_TAG, str(promoted).lower())
        client.set_model_version_tag(name, version, REASON_TAG, reason)
    return {
        "name": name,
        "version": version,
        "metric": champion_metric,
        "value": value,
        "promoted": promoted,
        "champion_version": version if promoted else previous,
        "previous_champion_version": previous,
        "previous_champion_value": previous_value,
        "reason": reason,
    }
