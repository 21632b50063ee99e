"""The quality gate: conditions on metrics.json keys (dotted keys reach nested values), with a report of each."""

from __future__ import annotations

from typing import Any

from lib.params import GateCondition


def metric_value(metrics: dict, key: str) -> Any:
    """Look up a dotted metric key ('per_class.sitting.f1'); keys that themselves hold dots are matched too."""
    if key in metrics:
        return metrics[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in metrics and isinstance(metrics[head], dict):
            return metric_value(metrics[head], ".".join(parts[i:]))
    raise KeyError(key)


def _gate_failure(cond: GateCondition, metrics: dict) -> tuple[Any, str]:
    """(value, failure message or '') for one condition."""
    bounds = " and ".join(f"{n} {v:g}" for n, v in (("min", cond.min), ("max", cond.max)) if v is not None)
    try:
        value = metric_value(metrics, cond.metric)
    except KeyError:
        return None, f"{cond.metric}: missing from metrics (gate needs {bounds})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, f"{cond.metric}: not a number (got {value!r}; gate needs {bounds})"
    if value != value:  # NaN passes no comparison
        return value, f"{cond.metric}: is NaN (gate needs {bounds})"
    if cond.min is not None and value < cond.min:
        return value, f"{cond.metric} = {value:.4f} is below min {cond.min:.4f} by {cond.min - value:.4f}"
    if cond.max is not None and value > cond.max:
        return value, f"{cond.metric} = {value:.4f} is above max {cond.max:.4f} by {value - cond.max:.4f}"
    return value, ""


def gate_report(metrics: dict, conditions: list[GateCondition]) -> list[dict]:
    """One row per condition: metric, value, min, max, passed, and the failure message (empty when passed)."""
    rows = []
    for cond in conditions:
        value, failure = _gate_failure(cond, metrics)
        rows.append(
            {
                "metric": cond.metric,
                "value": value,
                "min": cond.min,
                "max": cond.max,
                "passed": not failure,
                "failure": failure,
            }
        )
    return rows


def check_gate(metrics: dict, conditions: list[GateCondition]) -> list[str]:
    """Failed conditions, each naming the metric, the threshold and by how much it was missed."""
    return [row["failure"] for row in gate_report(metrics, conditions) if row["failure"]]
